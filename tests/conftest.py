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
    from bot.pipelines import PipelineOptions, PipelineRunner

    runner = PipelineRunner(PipelineOptions(device="cpu", cache_dir=model_cache))
    runner.load("tiny")
    return runner


@pytest.fixture
def settings(tmp_path, model_cache):
    return Settings(
        discord_token="",
        model_id="tiny",
        database_path=tmp_path / "bot.sqlite3",
        model_cache=model_cache,
        device="cpu",
        max_batch_size=4,
        limits=TEST_LIMITS,
    )


def with_changes(settings: Settings, **changes) -> Settings:
    return replace(settings, **changes)
