"""`python -m bot` as a child process against the fake Discord: its environment, starting,
waiting, signalling and reading its database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from fakediscord import FakeDiscord

from bot.db import Store, jobs
from bot.db.jobs import JobRecord

REPO_ROOT = Path(__file__).resolve().parents[2]


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
            return await store.read(jobs.get, job_id)
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
