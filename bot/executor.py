"""The device worker: drains the queue in batches, one diffusers call per batch.

The asyncio side claims batches from the store and resolves jobs; the diffusers call runs in
the executor's own thread, so the event loop (and Discord's heartbeat) never waits on torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from bot.requests import BatchKey, ImageSpec, Job
from bot.store import Store

log = logging.getLogger(__name__)


class Runner(Protocol):
    """What the executor needs from the pipelines: one call, one image per spec, in order."""

    def generate(self, key: BatchKey, specs: list[ImageSpec]) -> Sequence[Any]: ...


@dataclass(frozen=True)
class JobResult:
    """A finished job: its images (objects with `.image` and `.withheld`) or an error."""

    job: Job
    images: list[Any]
    error: str | None
    seconds: float
    batch_id: int
    batch_images: int


Deliver = Callable[[JobResult], Awaitable[None]]


class Executor:
    def __init__(
        self, store: Store, runner: Runner, *, max_batch_size: int, deliver: Deliver
    ) -> None:
        self._store = store
        self._runner = runner
        self._max_batch_size = max_batch_size
        self._deliver = deliver
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-worker")
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.busy_since: float | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._drain_forever(), name="executor")
        self.wake()

    def wake(self) -> None:
        """Called after admission: the jobs table is the queue, this is only the doorbell."""
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self) -> None:
        """Wait until every queued job has been run and delivered."""
        await self._idle.wait()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._thread.shutdown(wait=True, cancel_futures=True)

    async def run_in_worker(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run blocking device work (model loading, a diffusers call) in the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, func, *args)

    async def _drain_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (claimed := await self._store.claim_batch(self._max_batch_size)) is not None:
                await self._run_batch(*claimed)
            if not self._wake.is_set():  # a job admitted during the last claim is still due
                self._idle.set()

    async def _run_batch(self, batch_id: int, jobs: list[Job]) -> None:
        key = jobs[0].request.batch_key
        specs = [spec for job in jobs for spec in job.image_specs]
        self.busy_since = time.monotonic()
        started = time.perf_counter()
        try:
            images: list[Any] = []
            for start in range(0, len(specs), self._max_batch_size):
                chunk = specs[start : start + self._max_batch_size]
                images.extend(await self.run_in_worker(self._runner.generate, key, chunk))
            error = None
        except Exception as exc:  # one failed call must not take down the worker
            log.exception("batch %s failed", batch_id)
            images, error = [], f"{type(exc).__name__}: {exc}"
        finally:
            self.busy_since = None
        seconds = time.perf_counter() - started
        await self._store.finish_batch(batch_id)

        offset = 0
        for job in jobs:
            own = images[offset : offset + job.request.count]
            offset += job.request.count
            if error is None:
                await self._store.mark_done(job.id, withheld=sum(i.withheld for i in own))
            else:
                await self._store.mark_failed(job.id, error)
            result = JobResult(job, own, error, seconds, batch_id, len(specs))
            try:
                await self._deliver(result)
            except Exception:
                log.exception("delivering job %s failed", job.id)
