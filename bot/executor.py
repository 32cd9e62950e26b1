"""The device worker: drains the queue in batches, one diffusers call per batch.

The asyncio side claims batches from the store and resolves jobs; the diffusers call runs in
the executor's own thread, so the event loop (and Discord's heartbeat) never waits on torch.
A failed call is split in halves and retried, so one bad image or an out-of-memory error
fails only the jobs it must, and the batch cap for that key shrinks until calls fit again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Protocol

import PIL.Image

from bot.background import cancel_and_wait
from bot.batching import BatchCaps
from bot.db import Store, Tx, jobs, speeds
from bot.eta import SpeedKey
from bot.handoff import RETRY_SECONDS, Deliver, Handoff, JobResult
from bot.images import png_bytes, read_png
from bot.queue import QueueIndex
from bot.requests import BatchKey, ImageSpec, Job
from bot.results import GeneratedImage, Interrupted, StepProgress

log = logging.getLogger(__name__)


class Runner(Protocol):
    """What the executor needs from the pipelines: one call, one image per spec, in order;
    `progress(done, total, previews)` after each step, with previews every few steps."""

    def generate(
        self,
        key: BatchKey,
        specs: list[ImageSpec],
        *,
        progress: StepProgress | None = None,
        preview_every: int = 0,
    ) -> Sequence[GeneratedImage]: ...

    def release_memory(self) -> None: ...

    def batch_limit(self, key: BatchKey) -> int | None: ...

    def interrupt(self) -> None: ...

    def resume(self) -> None: ...


# (job ids in the call, steps done, steps in all, PNG preview per job id or None): called on
# the event loop after each step.
Progress = Callable[[list[int], int, int, dict[int, bytes] | None], None]


class ProgressListeners:
    """Fans one executor's progress out to whoever listens (status boards); with nobody
    listening it is empty, and the executor then skips encoding previews."""

    def __init__(self) -> None:
        self._listeners: list[Progress] = []

    def add(self, listener: Progress) -> None:
        self._listeners.append(listener)

    def remove(self, listener: Progress) -> None:
        self._listeners.remove(listener)

    def __len__(self) -> int:
        return len(self._listeners)

    def __call__(
        self, job_ids: list[int], done: int, total: int, previews: dict[int, bytes] | None
    ) -> None:
        for listener in list(self._listeners):
            try:
                listener(job_ids, done, total, previews)
            except Exception:
                log.exception("a progress listener failed")


def is_out_of_memory(error: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError and its MPS/CPU cousins, without importing torch here."""
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()


def preview_pngs(owners: list[int], previews: list[PIL.Image.Image]) -> dict[int, bytes]:
    """Each job's first preview image as a PNG; `owners[i]` is the job of image i."""
    firsts: dict[int, PIL.Image.Image] = {}
    for owner, image in zip(owners, previews, strict=True):
        firsts.setdefault(owner, image)
    return {owner: png_bytes(image) for owner, image in firsts.items()}


def describe_error(error: BaseException) -> str:
    if is_out_of_memory(error):
        return "the image did not fit in GPU memory even alone; try a smaller size"
    return f"{type(error).__name__}: {error}"


async def image_specs(store: Store, batch: list[Job]) -> list[ImageSpec]:
    """The specs of every image in the batch, with init images read from the store for
    image-to-image jobs (a missing one fails its job alone, in the runner's checks)."""
    specs: list[ImageSpec] = []
    for job in batch:
        init_image = None
        if job.request.init_image_hash is not None:
            png = await store.read(jobs.init_image, job.request.init_image_hash)
            if png is not None:
                init_image = await asyncio.to_thread(read_png, png)
        specs += [replace(spec, init_image=init_image) for spec in job.image_specs]
    return specs


def job_results(
    batch: list[Job], outcomes: list[GeneratedImage | BaseException], cancelled: set[int]
) -> list[JobResult]:
    """Each job's share of the call's outcomes (one per image, in batch order): its images,
    or the first reason one of them failed, or nothing when its member cancelled it."""
    results, offset = [], 0
    for job in batch:
        own = outcomes[offset : offset + job.request.count]
        offset += job.request.count
        if job.id in cancelled:
            results.append(JobResult(job, [], None, 0.0, 0, 0, cancelled=True))
            continue
        errors = [o for o in own if isinstance(o, BaseException)]
        images = [o for o in own if not isinstance(o, BaseException)]
        blank = [image.error for image in images if image.error]
        error = describe_error(errors[0]) if errors else (blank[0] if blank else None)
        results.append(JobResult(job, [] if error else images, error, 0.0, 0, 0))
    return results


class Executor:
    """Hands each finished job to `deliver`, and each step to `progress` when it is not empty."""

    def __init__(
        self,
        store: Store,
        runner: Runner,
        queue: QueueIndex,
        *,
        max_batch_size: int,
        deliver: Deliver,
        progress: Progress | None = None,
        preview_every: int = 0,
    ) -> None:
        self._store = store
        self._runner = runner
        self._queue = queue
        self._max_batch_size = max_batch_size
        self._deliver = deliver
        self._progress = progress
        self._preview_every = preview_every
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-worker")
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._in_flight: list[int] = []  # the jobs of the diffusers call running now
        self._undelivered: list[int] = []  # claimed jobs not yet delivered and marked
        # Results wait in the handoff, so uploads to Discord never hold up the device: the
        # next batch starts while the last one is still being posted.
        self._handoff = Handoff(store, deliver, self._delivered)
        self._cancelled: set[int] = set()
        self._steps: tuple[int, int] = (0, 0)
        self.caps = BatchCaps(self.ceiling_for)
        self.busy_since: float | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._drain_forever(), name="executor")
        self._handoff.start()
        self.wake()

    def wake(self) -> None:
        """Called after admission: the jobs table is the queue, this is only the doorbell."""
        self._idle.clear()
        self._wake.set()

    async def wait_idle(self) -> None:
        """Wait until every queued job has been run and delivered."""
        await self._idle.wait()

    async def stop(self, grace: float = 0.0) -> None:
        """Claim nothing more; give the running batch and the pending deliveries `grace`
        seconds, then interrupt and put the undelivered jobs back in the queue for the next
        start."""
        self._stopping = True
        self._wake.set()
        if self._task is not None and not self._task.done() and self._undelivered:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), grace)
            except TimeoutError:
                self._runner.interrupt()
        await cancel_and_wait(self._task)
        await self._handoff.stop()
        if self._undelivered:
            log.info("returning %d interrupted job(s) to the queue", len(self._undelivered))
            await self._store.write(jobs.return_to_queue, self._undelivered)
        await asyncio.to_thread(self._thread.shutdown, wait=True, cancel_futures=True)

    def expected_remaining(self) -> float:
        """Seconds the running call still needs, extrapolated from its steps so far."""
        done, total = self._steps
        if self.busy_since is None or done == 0:
            return 0.0
        elapsed = time.monotonic() - self.busy_since
        return elapsed * (total - done) / done

    def note_cancelled(self, job_id: int) -> None:
        """A running job was cancelled: when every job in the call is, stop the call at the
        next step instead of finishing images nobody wants."""
        self._cancelled.add(job_id)
        if self._in_flight and self._cancelled.issuperset(self._in_flight):
            self._runner.interrupt()

    def ceiling_for(self, key: BatchKey) -> int:
        """The most images one call of this key may hold: MAX_BATCH_SIZE, or fewer where the
        runner measured that fewer fit in device memory."""
        limit = self._runner.batch_limit(key)
        return self._max_batch_size if limit is None else min(limit, self._max_batch_size)

    async def run_in_worker(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run blocking device work (model loading, a diffusers call) in the worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, func, *args)

    async def _drain_forever(self) -> None:
        """Claim and run batches until stopped. A failure outside the diffusers call (a
        database error) is logged and the drain resumes: the batch it hit fails its jobs with
        a refund (see `_run_claimed`), and a failed claim is tried again shortly."""
        while not self._stopping:
            await self._wake.wait()
            self._wake.clear()
            try:
                while not self._stopping and (claimed := await self.claim_next()):
                    await self._run_claimed(*claimed)
                await self._handoff.join()
            except Exception:
                log.exception("the executor's drain failed; retrying in %g s", RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
                self._wake.set()
                continue
            if not self._wake.is_set():  # a job admitted during the last claim is still due
                self._idle.set()

    async def claim_next(self) -> tuple[int, list[Job]] | None:
        """Claim the call the fair former chose. It chooses inside the claim's transaction,
        so admissions already waiting for the database land first and can share the call;
        where the store disagrees with the index (a job cancelled, changed or queued behind
        its back), the index is rebuilt from the store and the choice made again."""
        if not self._queue and await self._store.read(jobs.any_queued):
            await self.reload_queue(out_of_step=True)
        while True:
            chosen: list[Job] = []
            claimed = await self._store.write(self._choose_and_claim, chosen)
            if not chosen:
                return None
            if claimed is None or len(claimed[1]) != len(chosen):
                await self.reload_queue(out_of_step=True)
            else:
                self._queue.claimed(chosen)
            if claimed is not None:
                return claimed

    async def _choose_and_claim(self, tx: Tx, chosen: list[Job]) -> tuple[int, list[Job]] | None:
        chosen.extend(self._queue.next_batch(self.caps.cap))
        return await jobs.claim_batch(tx, [job.id for job in chosen]) if chosen else None

    async def reload_queue(self, out_of_step: bool = False) -> None:
        """Load the queue index from the database, the truth (at start-up, after a mismatch)."""
        if out_of_step:
            log.warning("the queue index was out of step with the database; rebuilding it")
        self._queue.load(await self._store.read(jobs.pending))

    async def _run_claimed(self, batch_id: int, batch: list[Job]) -> None:
        """Run a claimed batch and hand its results to the delivery task; if anything but the
        diffusers call fails, its jobs fail (and are refunded) rather than stay running."""
        job_ids = [job.id for job in batch]
        self._undelivered += job_ids
        try:
            results = await self._run_batch(batch_id, batch)
        except Exception as error:
            log.exception("batch %s (jobs %s) failed; failing its jobs", batch_id, job_ids)
            problem = f"an internal error stopped it ({type(error).__name__})"
            results = [JobResult(job, [], problem, 0.0, batch_id, 0) for job in batch]
        for result in results:
            self._handoff.put(result)

    def _progress_reporter(self, owners: list[int]) -> StepProgress:
        """A step callback for the worker thread: `owners[i]` is the job of image i. Previews
        are encoded there (small PNGs), then progress is handed to the event loop."""
        loop = asyncio.get_running_loop()
        job_ids = list(dict.fromkeys(owners))

        def report(done: int, total: int, previews: list[PIL.Image.Image] | None = None) -> None:
            self._steps = (done, total)
            if not self._progress:  # None, or nobody listening: encode nothing
                return
            pngs = preview_pngs(owners, previews) if previews else None
            loop.call_soon_threadsafe(self._progress, job_ids, done, total, pngs)

        return report

    async def _generate(
        self, key: BatchKey, specs: list[ImageSpec], owners: list[int]
    ) -> list[GeneratedImage | BaseException]:
        """One result per spec: an image, or the exception that image could not get past.
        Calls run at the key's cap; a failed call is split in halves until the culprit is
        alone, so the other members' images still come out."""
        cap = self.caps.cap(key)
        if len(specs) > cap:
            results: list[GeneratedImage | BaseException] = []
            for start in range(0, len(specs), cap):
                end = start + cap
                results += await self._generate(key, specs[start:end], owners[start:end])
            return results
        report = self._progress_reporter(owners)
        started = time.perf_counter()
        try:
            images = list(
                await self.run_in_worker(
                    functools.partial(
                        self._runner.generate,
                        key,
                        specs,
                        progress=report,
                        preview_every=self._preview_every,
                    )
                )
            )
        except Exception as error:
            if isinstance(error, Interrupted):  # asked to stop: no retry, no split
                return [error] * len(specs)
            if is_out_of_memory(error):
                await self.run_in_worker(self._runner.release_memory)
                cap = self.caps.shrink(key, len(specs))
                log.warning(
                    "out of memory at %d images; cap for this size is now %d", len(specs), cap
                )
            else:
                log.exception("a diffusers call of %d image(s) failed", len(specs))
            if len(specs) == 1:
                return [error]
            half = len(specs) // 2
            first = await self._generate(key, specs[:half], owners[:half])
            return first + await self._generate(key, specs[half:], owners[half:])
        self.caps.succeeded(key)
        speed_key = SpeedKey(key.model, key.width * key.height, len(specs))
        seconds_per_step = (time.perf_counter() - started) / key.denoising_steps
        await self._store.write(speeds.record, speed_key, seconds_per_step)
        return images

    async def _run_batch(self, batch_id: int, batch: list[Job]) -> list[JobResult]:
        key = batch[0].request.batch_key
        specs = await image_specs(self._store, batch)
        owners = [job.id for job in batch for _ in range(job.request.count)]
        self._in_flight = [job.id for job in batch]
        self._runner.resume()  # an interrupt meant for an earlier batch does not stop this one
        self._steps = (0, 0)
        self.busy_since = time.monotonic()
        started = time.perf_counter()
        try:
            outcomes = await self._generate(key, specs, owners)
        finally:
            self.busy_since = None
            self._in_flight = []
        seconds = time.perf_counter() - started
        await self._store.write(jobs.finish_batch, batch_id)
        cancelled = await self._store.read(jobs.cancel_requested, [job.id for job in batch])
        return [
            replace(result, seconds=seconds, batch_id=batch_id, batch_images=len(specs))
            for result in job_results(batch, outcomes, cancelled)
        ]

    def _delivered(self, result: JobResult) -> None:
        """The handoff is done with a job: it no longer goes back to the queue on stop."""
        self._cancelled.discard(result.job.id)
        with contextlib.suppress(ValueError):
            self._undelivered.remove(result.job.id)
