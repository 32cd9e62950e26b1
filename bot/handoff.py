"""Finished jobs on their way out of the executor: a `JobResult` per job, handed to `deliver`
by the handoff's own task (uploads never hold up the device), after which the job is marked
done, failed or cancelled in the store.

A result is delivered before its job is marked: a crash in between leaves the job running,
so the next start runs it again and finds or re-posts it once. A result that could not be
delivered (`Undeliverable`) fails its job with a refund; it is never marked done. A failure
here is logged with the job's id and the next result is handled all the same."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bot.background import cancel_and_wait
from bot.db import Store, jobs
from bot.requests import Job
from bot.results import GeneratedImage

log = logging.getLogger(__name__)

# After a background step fails (a database error), wait this long before trying again.
RETRY_SECONDS = 1.0


@dataclass(frozen=True)
class JobResult:
    """A finished job: its images or an error."""

    job: Job
    images: list[GeneratedImage]
    error: str | None
    seconds: float
    batch_id: int
    batch_images: int
    cancelled: bool = False


class Undeliverable(Exception):
    """Raised by `deliver` when a job's images could not be posted anywhere (too big for
    Discord, refused): the job then fails with a refund instead of being marked done. The
    message says why, for the job's error."""


Deliver = Callable[[JobResult], Awaitable[None]]


class Handoff:
    """Results wait here, in order, for the delivery task; `finished(result)` is called once
    each is delivered and marked (or given up on)."""

    def __init__(
        self, store: Store, deliver: Deliver, finished: Callable[[JobResult], None]
    ) -> None:
        self._store = store
        self._deliver = deliver
        self._finished = finished
        self._results: asyncio.Queue[JobResult] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._deliver_forever(), name="delivery")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def put(self, result: JobResult) -> None:
        self._results.put_nowait(result)

    async def join(self) -> None:
        """Until every result handed over so far is delivered and marked."""
        await self._results.join()

    async def _deliver_forever(self) -> None:
        while True:
            result = await self._results.get()
            try:
                await self._finish(result)
            except Exception:
                log.exception("finishing job %s failed; it is left running", result.job.id)
            finally:
                self._finished(result)
                self._results.task_done()

    async def _finish(self, result: JobResult) -> None:
        job = result.job
        if result.cancelled:  # refunded first, so the member is told the truth
            await self._write_retrying(jobs.mark_cancelled, job.id)
            await self._deliver_safely(result)
            return
        undelivered = await self._deliver_safely(result)
        error = result.error or undelivered
        if error is None:
            withheld = sum(image.withheld for image in result.images)
            await self._write_retrying(jobs.mark_done, job.id, withheld=withheld)
        else:
            await self._write_retrying(jobs.mark_failed, job.id, error)

    async def _write_retrying(
        self, change: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any
    ) -> None:
        """A write that marks a finished job, tried once more after a failure: a database
        that is briefly locked or failing must not leave the job running."""
        try:
            await self._store.write(change, *args, **kwargs)
        except Exception:
            log.warning("%s%s failed; trying again", change.__name__, args, exc_info=True)
            await asyncio.sleep(RETRY_SECONDS)
            await self._store.write(change, *args, **kwargs)

    async def _deliver_safely(self, result: JobResult) -> str | None:
        """Hand the result to `deliver`; returns why it could not be delivered, or None."""
        try:
            await self._deliver(result)
        except Undeliverable as problem:
            log.warning("job %s could not be delivered: %s", result.job.id, problem)
            return f"could not be delivered: {problem}"
        except Exception:
            log.exception("delivering job %s failed", result.job.id)
            return "could not be delivered"
        return None
