"""The bot in this process, against the fake Discord: its world (a guild with members), a
model runner that can hold a batch, and `running_bot`, which starts the bot as
`python -m bot` does (bot.lifecycle.online)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import discord
from discord.gateway import DiscordWebSocket
from fakediscord import FakeChannel, FakeDiscord, FakeGuild, FakeMember, InteractionHandle

from bot.__main__ import make_bot, open_service
from bot.app import ImagineBot
from bot.db import Store, jobs
from bot.db.jobs import JobRecord
from bot.lifecycle import online
from bot.requests import BatchKey, ImageSpec
from bot.service import ImagineService
from bot.settings import Settings
from harness.answers import job_id_of

# ---- the world ------------------------------------------------------------------------------


@dataclass
class World:
    """A guild with two plain members and a moderator; `channel` is its #general."""

    fake: FakeDiscord
    guild: FakeGuild
    alice: FakeMember
    bob: FakeMember
    mod: FakeMember

    @property
    def channel(self) -> FakeChannel:
        return self.guild.channel


def build_world(fake: FakeDiscord) -> World:
    guild = fake.add_guild("Test Server")
    return World(
        fake,
        guild,
        fake.add_member(guild, "alice"),
        fake.add_member(guild, "bob"),
        fake.add_member(guild, "mod", moderator=True),
    )


# ---- a runner that can hold a batch ---------------------------------------------------------


class HeldRunner:
    """The real model runner with a gate in front: while held, each diffusers call waits in
    the worker thread until `release()`. Lets a test queue jobs "while a batch runs"."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner
        self._open = threading.Event()
        self._open.set()
        self.calls: list[tuple[BatchKey, list[ImageSpec]]] = []

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def generate(self, key: BatchKey, specs: list[ImageSpec], **kwargs: Any) -> Sequence[Any]:
        self.calls.append((key, list(specs)))
        if not self._open.wait(300):  # the pytest timeout ends a test that forgot first
            raise TimeoutError("HeldRunner was never released")
        return self._runner.generate(key, specs, **kwargs)

    async def wait_calls(self, count: int, timeout: float = 10.0) -> None:
        """Until `count` diffusers calls have started (held ones included)."""
        deadline = time.monotonic() + timeout
        while len(self.calls) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.calls)} of {count} diffusers calls started")
            await asyncio.sleep(0.01)

    def interrupt(self) -> None:
        """Let a held call go (shutdown must not wait on the test), then pass it on."""
        self.release()
        self._runner.interrupt()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)


def allowlist_runner(model_cache: Path, models_file: Path, names: Sequence[str]) -> Any:
    """The real runner on the allowlist in `models_file`, with the models `names` loaded once,
    for a module's tests to share."""
    import torch

    from bot.models import load_catalog
    from bot.pipelines import PipelineOptions, PipelineRunner

    torch.set_num_threads(1)  # as conftest's tiny_runner: a second thread fights the loop
    options = PipelineOptions(device="cpu", cache_dir=model_cache)
    runner = PipelineRunner(options, load_catalog(models_file, "tiny"))
    for name in names:
        runner.load(name)
    return runner


# ---- the bot in this process ----------------------------------------------------------------


@dataclass
class RunningBot:
    """The bot connected to `fake`, with its service, store and runner."""

    fake: FakeDiscord
    bot: ImagineBot
    service: ImagineService
    runner: Any

    @property
    def store(self) -> Store:
        return self.service.store

    @staticmethod
    def module(name: str) -> ModuleType:
        """An extension module as the bot loaded it (e.g. to monkeypatch a constant in
        "cogs.imagine"): discord.py loads each extension as a fresh module object, so
        `import cogs.imagine` in a test may name a different one."""
        return sys.modules[name]

    async def imagine(
        self, member: FakeMember, channel: FakeChannel | None = None, **options: Any
    ) -> InteractionHandle:
        """`/imagine` as `member` (in the guild's #general unless `channel` is given)."""
        if channel is None:
            channel = self.fake.guild(member.guild_id).channel
        return await self.fake.slash_command(member, channel, "imagine", options)

    async def queued_job(self, inter: InteractionHandle, timeout: float = 10.0) -> JobRecord:
        """The job the bot's "Queued as job #N" response names."""
        response = await inter.wait_response(timeout)
        record = await self.store.read(jobs.get, job_id_of(response.content))
        assert record is not None, f"job in {response.content!r} is not in the store"
        return record

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Until every queued job has run and been delivered."""
        await asyncio.wait_for(self.service.executor.wait_idle(), timeout)


@asynccontextmanager
async def running_bot(
    fake: FakeDiscord, settings: Settings, *, runner: Any = None
) -> AsyncIterator[RunningBot]:
    """`python -m bot` against `fake`, in this process: the service on `runner` (e.g. the
    session's tiny runner, so the model is not loaded again), brought online by the same
    `online` as `run_bot`. On exit it goes offline as on SIGTERM: stop admitting, let the
    running batch finish within `settings.shutdown_grace`, then leave the gateway."""
    settings = replace(settings, discord_token=fake.token, discord_api_base=fake.api_base)
    if runner is None:
        service = await open_service(settings)
    else:
        service = ImagineService(settings, await Store.open(settings.database_path), runner)
    saved = discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY  # make_bot changes them
    bot = make_bot(settings, service)
    try:
        async with online(settings, service, bot):
            await fake.wait_until_ready(10)
            yield RunningBot(fake, bot, service, service.runner)
    finally:
        await service.store.close()  # in case closing the service failed half-way
        discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved


def allowlist_file(folder: Path, text: str) -> Path:
    """A models.toml holding `text` in `folder`, for a module's allowlist."""
    path = folder / "models.toml"
    path.write_text(text)
    return path


@asynccontextmanager
async def held_bot(
    fake: FakeDiscord, settings: Settings, runner: HeldRunner
) -> AsyncIterator[RunningBot]:
    """The bot on `runner`, its gate released however the test ends: a test that failed
    while holding must not stall teardown."""
    async with running_bot(fake, settings, runner=runner) as running:
        try:
            yield running
        finally:
            runner.release()
