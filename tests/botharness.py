"""The real bot against the fake Discord, in this process or as `python -m bot`.

In process (fixtures `discord_world` and `imagine_bot` in conftest.py):

    async def test_panda(discord_world, imagine_bot):
        inter = await imagine_bot.imagine(discord_world.alice, prompt="a panda", seed=1)
        record = await imagine_bot.queued_job(inter)
        followup = await inter.wait_followup()

As a child process (see test_bot_process.py):

    process = BotProcess.start(fake, model_cache, workdir, MAX_SIZE="256")
    await process.wait_ready(fake)
    ...
    assert await process.stop() == 0
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import discord
import numpy as np
from discord.gateway import DiscordWebSocket
from fakediscord import (
    FakeAttachment,
    FakeChannel,
    FakeDiscord,
    FakeGuild,
    FakeMember,
    InteractionHandle,
)
from PIL import Image

from bot.__main__ import make_bot, open_service
from bot.app import ImagineBot
from bot.discord_api import use_advertised_gateway
from bot.requests import BatchKey, ImageSpec
from bot.service import ImagineService
from bot.settings import Settings
from bot.store import JobRecord, Store

REPO_ROOT = Path(__file__).resolve().parent.parent
JOB_NUMBER = re.compile(r"job #(\d+)")


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


# ---- reading the bot's answers --------------------------------------------------------------


def job_id_of(text: str | None) -> int:
    """The N of "job #N" in a bot message."""
    found = JOB_NUMBER.search(text or "")
    if found is None:
        raise AssertionError(f"no job number in {text!r}")
    return int(found[1])


def pixels(source: FakeAttachment | bytes | Image.Image) -> np.ndarray:
    """An image's RGB pixels as int16, so differences do not wrap around."""
    if isinstance(source, FakeAttachment):
        source = source.data
    if isinstance(source, bytes):
        source = Image.open(io.BytesIO(source))
    return np.asarray(source.convert("RGB"), dtype=np.int16)


def embed_field(message_or_callback: Any, name: str) -> str | None:
    """The value of the first embed's field `name`, or None."""
    embeds = message_or_callback.embeds
    for item in embeds[0].get("fields", []) if embeds else []:
        if item["name"] == name:
            return item["value"]
    return None


def attachment_names(message: Any) -> list[str]:
    return [a.filename for a in message.attachments]


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
        if not self._open.wait(60):
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
        record = await self.store.job(job_id_of(response.content))
        assert record is not None, f"job in {response.content!r} is not in the store"
        return record

    async def wait_idle(self, timeout: float = 30.0) -> None:
        """Until every queued job has run and been delivered."""
        await asyncio.wait_for(self.service.executor.wait_idle(), timeout)


@asynccontextmanager
async def running_bot(
    fake: FakeDiscord, settings: Settings, *, runner: Any = None
) -> AsyncIterator[RunningBot]:
    """What `run_bot` does, against `fake`: open the service (on `runner`, e.g. the session's
    tiny runner, so the model is not loaded again), log in, start the executor and connect.
    On exit: stop admitting, let the running batch finish within `settings.shutdown_grace`,
    then leave the gateway, as on SIGTERM."""
    settings = replace(settings, discord_token=fake.token, discord_api_base=fake.api_base)
    if runner is None:
        service = await open_service(settings)
    else:
        service = ImagineService(settings, await Store.open(settings.database_path), runner)
    saved = discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    bot = make_bot(settings, service)
    connection: asyncio.Task[None] | None = None
    try:
        async with bot:
            await bot.login(settings.discord_token)
            await use_advertised_gateway(bot)
            await service.start()
            connection = asyncio.create_task(bot.connect(), name="bot.connect")
            await fake.wait_until_ready(10)
            try:
                yield RunningBot(fake, bot, service, service.runner)
            finally:
                try:
                    await service.close(settings.shutdown_grace)
                finally:
                    await bot.close()
    finally:
        await service.close()
        await service.store.close()  # in case closing the service failed half-way
        if connection is not None:
            await asyncio.wait_for(connection, 10)
        discord.http.Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = saved


# ---- the bot as a child process -------------------------------------------------------------


def bot_environment(
    fake: FakeDiscord, model_cache: Path, workdir: Path, **overrides: str
) -> dict[str, str]:
    """Environment for `python -m bot` against `fake` with the tiny model and small limits;
    `overrides` win (e.g. DEVICE="tpu", SHUTDOWN_GRACE="1")."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DISCORD_", "MODEL_", "DEFAULT_", "MAX_", "MIN_"))
    }
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])),
        PYTHONUNBUFFERED="1",
        HF_HUB_OFFLINE="1",
        # One torch thread: beside the tests on a small machine, two threads oversubscribe
        # the cores and a batch runs several times slower.
        OMP_NUM_THREADS="1",
        DISCORD_TOKEN=fake.token,
        DISCORD_API_BASE=fake.api_base,
        MODEL_ID="tiny",
        MODEL_CACHE=str(model_cache),
        DATABASE_PATH=str(workdir / "bot.sqlite3"),
        DEVICE="cpu",
        MIN_SIZE="64",
        DEFAULT_WIDTH="64",
        DEFAULT_HEIGHT="64",
        DEFAULT_STEPS="4",
        MAX_STEPS="20",
        LOG_LEVEL="INFO",
    )
    env.update(overrides)
    return env


@dataclass
class BotProcess:
    """`python -m bot` running in `workdir`; its stdout and stderr (the log) go to `log_path`."""

    process: subprocess.Popen[bytes]
    workdir: Path
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @classmethod
    def start(
        cls, fake: FakeDiscord, model_cache: Path, workdir: Path, **overrides: str
    ) -> BotProcess:
        workdir.mkdir(parents=True, exist_ok=True)
        env = bot_environment(fake, model_cache, workdir, **overrides)
        log_path = workdir / "bot.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "bot"],
                cwd=workdir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return cls(process, workdir, log_path, env)

    @property
    def database_path(self) -> Path:
        return Path(self.env["DATABASE_PATH"])

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines(self) -> list[str]:
        return self.log().splitlines()

    async def wait_ready(self, fake: FakeDiscord, timeout: float = 90.0) -> None:
        """Until the bot identified and got READY; fails at once if the process exits."""
        deadline = time.monotonic() + timeout
        while True:
            if self.returncode is not None:
                raise AssertionError(f"the bot exited with {self.returncode}:\n{self.log()}")
            with contextlib.suppress(TimeoutError):
                await fake.wait_until_ready(0.25)
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bot did not connect in {timeout}s:\n{self.log()}")

    async def wait_log(self, text: str, timeout: float = 10.0) -> str:
        """The first log line containing `text`."""
        deadline = time.monotonic() + timeout
        while True:
            line = next((line for line in self.log_lines() if text in line), None)
            if line is not None:
                return line
            if time.monotonic() > deadline:
                raise TimeoutError(f"no log line with {text!r} in {timeout}s:\n{self.log()}")
            await asyncio.sleep(0.05)

    async def wait_exit(self, timeout: float = 10.0) -> int:
        deadline = time.monotonic() + timeout
        while (code := self.returncode) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bot did not exit in {timeout}s:\n{self.log()}")
            await asyncio.sleep(0.05)
        return code

    def terminate(self) -> None:
        """Send SIGTERM, as `docker stop` or systemd would."""
        self.process.send_signal(signal.SIGTERM)

    async def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then the exit code."""
        if self.returncode is None:
            self.terminate()
        return await self.wait_exit(timeout)

    def kill(self) -> None:
        """Teardown: make sure the process is gone, whatever the test did."""
        if self.returncode is None:
            self.process.kill()
            self.process.wait(10)

    async def wait_job(self, job_id: int, status: str, timeout: float = 10.0) -> JobRecord:
        """Until the job's row has `status` (e.g. "running": the batch has started)."""
        deadline = time.monotonic() + timeout
        while True:
            record = await self.job(job_id)
            if record is not None and record.job.status == status:
                return record
            if time.monotonic() > deadline:
                found = record and record.job.status
                raise TimeoutError(f"job {job_id} is {found!r}, not {status!r}, after {timeout}s")
            await asyncio.sleep(0.05)

    async def job(self, job_id: int) -> JobRecord | None:
        """A job row from the bot's database (safe while it runs: SQLite in WAL mode)."""
        store = await Store.open(self.database_path)
        try:
            return await store.job(job_id)
        finally:
            await store.close()


def run_bot_command(
    fake: FakeDiscord,
    model_cache: Path,
    workdir: Path,
    *args: str,
    timeout: float = 60.0,
    **overrides: str,
) -> subprocess.CompletedProcess[str]:
    """`python -m bot ARGS` to completion, with stdout and stderr captured."""
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        cwd=workdir,
        env=bot_environment(fake, model_cache, workdir, **overrides),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
