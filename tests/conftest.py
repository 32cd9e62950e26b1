"""Shared fixtures: the tiny random-weight model, built once per test session, offline."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach the Hub; set before diffusers loads

from dataclasses import replace

import pytest

from bot.requests import Limits
from bot.settings import Settings

pytest_plugins = ["fakediscord.pytest_plugin"]

# Small enough that a batch of 8 runs in about a second on two CPU cores.
TEST_LIMITS = Limits(
    max_steps=20,
    min_side=64,
    max_side=256,
    max_count=4,
    default_steps=4,
    default_guidance=7.5,
    default_width=64,
    default_height=64,
)


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory):
    """A model cache holding the tiny model, shared by every test that loads it."""
    from bot.pipelines import build_tiny_model

    cache = tmp_path_factory.mktemp("models")
    build_tiny_model(cache / "tiny-sd")
    return cache


@pytest.fixture(scope="session")
def tiny_runner(model_cache):
    import torch

    from bot.pipelines import PipelineOptions, PipelineRunner

    # One intra-op thread: on two cores a second torch thread fights the event loop (and the
    # fake Discord) for CPU and makes timings in the Discord tests erratic.
    torch.set_num_threads(1)
    runner = PipelineRunner(PipelineOptions(device="cpu", cache_dir=model_cache))
    runner.load("tiny")
    return runner


@pytest.fixture
def settings(tmp_path, model_cache):
    return Settings(
        discord_token="",
        model_id="tiny",
        database_path=tmp_path / "bot.sqlite3",
        models_file=tmp_path / "models.toml",  # none: the one model "tiny", as before allowlists
        model_cache=model_cache,
        device="cpu",
        max_batch_size=4,
        limits=TEST_LIMITS,
    )


def with_changes(settings: Settings, **changes) -> Settings:
    return replace(settings, **changes)


# ---- the real bot against the fake Discord (tests/harness/in_process.py) ---------------------


@pytest.fixture
def discord_world(fake_discord):
    """The fake Discord with a guild, two members (alice, bob) and a moderator (mod)."""
    from harness.in_process import build_world

    return build_world(fake_discord)


@pytest.fixture
def held_runner(tiny_runner):
    """The session's tiny runner behind a gate (`hold()` / `release()`); released at the end."""
    from harness.in_process import HeldRunner

    runner = HeldRunner(tiny_runner)
    yield runner
    runner.release()


@pytest.fixture
async def imagine_bot(discord_world, settings, held_runner):
    """The bot, connected to `discord_world.fake`, running on `held_runner`."""
    from harness.in_process import held_bot

    async with held_bot(discord_world.fake, settings, held_runner) as running:
        yield running
