"""The device workers' driver: drains the queue in batches, one diffusers call per batch and
one call in flight per worker.

The asyncio side claims batches from the store and resolves jobs; each worker runs its calls
off the event loop (a thread of this process, or a Ray actor: bot/workers.py), so the loop (and
Discord's heartbeat) never waits on torch. The bot stays the only scheduler: each worker's lane
claims from the same queue index, its claims serialized by the store's write transaction, and
prefers keys whose model the worker already holds; the queue's last call is shared with
another worker soon free rather than run whole while that one idles. A failed call is split in
halves and retried, so one bad image or an out-of-memory error fails only the jobs it must, and
the batch cap for that key shrinks until calls fit again. A worker lost mid-call returns its
jobs to the queue, where another worker claims them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bot.background import cancel_and_wait
from bot.batching import BatchCaps, share_of_last_call
from bot.db import Store, Tx, jobs, speeds
from bot.eta import SpeedKey
from bot.handoff import RETRY_SECONDS, Deliver, Handoff, JobResult
from bot.images import read_png
from bot.metrics import Metrics
from bot.queue import QueueIndex
from bot.requests import BatchKey, ImageSpec, Job
from bot.results import GeneratedImage, Interrupted
from bot.workers import (
    Call,
    Lane,
    Lanes,
    LocalWorker,
    ProgressListener,
    Runner,
    Worker,
    WorkerLost,
    describe_error,
    is_out_of_memory,
    lane_reporter,
    preview_pngs,
)

__all__ = [
    "Executor",
    "ExecutorTuning",
    "JobResult",
    "Outlets",
    "Runner",
    "describe_error",
    "is_out_of_memory",
    "preview_pngs",
]

log = logging.getLogger(__name__)


async def image_specs(store: Store, batch: list[Job]) -> list[ImageSpec]:
    """The specs of every image in the batch, with init images read from the store for
    image-to-image jobs, at the job's size (an upload is kept at the largest model's area; a
    missing one fails its job alone, in the runner's checks)."""
    specs: list[ImageSpec] = []
    for job in batch:
        init_image = None
        if job.request.init_image_hash is not None:
            png = await store.read(jobs.init_image, job.request.init_image_hash)
            if png is not None:
                size = (job.request.width, job.request.height)
                init_image = await asyncio.to_thread(read_png, png, size)
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


async def return_lost(store: Store, batch: list[Job], max_attempts: int) -> list[JobResult]:
    """A lost worker's jobs go back to the queue with the attempt counted (as after a crash);
    those claimed `max_attempts` times fail instead, with a refund: returned as results."""
    again = [job.id for job in batch if job.attempts < max_attempts]
    await store.write(jobs.return_to_queue, again, count_attempt=True)
    problem = f"the worker running it was lost {max_attempts} times"
    return [JobResult(job, [], problem, 0.0, 0, 0) for job in batch if job.id not in again]


async def choose_call(
    tx: Tx,
    queue: QueueIndex,
    cap: Callable[[BatchKey], int],
    lanes: Lanes,
    lane: Lane | None,
    resident: frozenset[str],
) -> list[Job]:
    """The fair former's call for `lane`'s worker, preferring the models it holds
    (`resident`). The queue's last call is shared with another worker soon free that holds its
    model (`share_of_last_call`), which is woken to take the rest."""
    batch = queue.next_batch(cap, resident)
    if lane is None or len(batch) < 2 or sum(j.request.count for j in batch) < queue.images():
        return batch
    free_in = lanes.others_free_in(lane, batch[0].request.model)
    if free_in == math.inf:  # one worker, or none other that could take a share
        return batch
    shared = share_of_last_call(batch, await speeds.measured(tx), free_in)
    if len(shared) < len(batch):
        lanes.wake()
    return shared


@dataclass(frozen=True)
class ExecutorTuning:
    """How big the executor's calls may be, how often they send previews (every
    `preview_every` steps; 0 never) and how often a lost worker's job is claimed again."""

    max_batch_size: int
    preview_every: int = 0
    max_attempts: int = 3


@dataclass(frozen=True)
class Outlets:
    """Where the executor's work goes: each finished job to `deliver`, each step of a call to
    `progress` (when it is None or empty, no previews are even drawn)."""

    deliver: Deliver
    progress: ProgressListener | None = None


class Executor:
    """Runs the queue's calls on `workers` (default: one thread around `runner`) as `tuning`
    says and sends what comes out to `outlets`; `runner` itself serves `run_in_worker` (the
    bot's own model loading and prompt counting)."""

    def __init__(
        self,
        store: Store,
        runner: Runner,
        queue: QueueIndex,
        tuning: ExecutorTuning,
        outlets: Outlets,
        *,
        workers: Callable[[], Sequence[Worker]] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """The executor, idle until `start`: its lanes open with the workers there."""
        self._store = store
        self._runner = runner
        self._queue = queue
        self._tuning = tuning
        self._progress = outlets.progress
        self._home = LocalWorker(runner)
        self._open_workers = workers or (lambda: [self._home])
        self.lanes = Lanes()
        self.metrics = metrics or Metrics()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._undelivered: list[int] = []  # claimed jobs not yet delivered and marked
        # Results wait in the handoff, so uploads to Discord never hold up the device: the
        # next batch starts while the last one is still being posted.
        self._handoff = Handoff(store, outlets.deliver, self._delivered)
        self._cancelled: set[int] = set()
        self.caps = BatchCaps(self.ceiling_for)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._open_and_drain(), name="executor")]
        self._handoff.start()

    async def _open_and_drain(self) -> None:
        """Open the workers (a Ray cluster takes seconds to join), then drain on each."""
        await self.lanes.open(self._open_workers)
        self.metrics.watch_workers(self.lanes.all)
        self._tasks += [
            asyncio.create_task(self._drain_forever(lane), name=f"executor {lane.worker.name}")
            for lane in self.lanes.all
        ]
        self.wake()

    def wake(self) -> None:
        """Called after admission: the jobs table is the queue, this is only the doorbell."""
        self.lanes.wake()

    async def wait_idle(self) -> None:
        """Wait until every queued job has been run and delivered."""
        await self.lanes.idle.wait()

    async def stop(self, grace: float = 0.0) -> None:
        """Claim nothing more; give the running calls and the pending deliveries `grace`
        seconds, then interrupt and put the undelivered jobs back in the queue for the next
        start."""
        self._stopping = True
        self.lanes.wake()
        running = [task for task in self._tasks if not task.done()]
        if running and self._undelivered:
            _, late = await asyncio.wait([asyncio.shield(t) for t in running], timeout=grace)
            if late:
                self.lanes.interrupt(None, self._cancelled)
        for task in self._tasks:
            await cancel_and_wait(task)
        await self._handoff.stop()
        if self._undelivered:
            log.info("returning %d interrupted job(s) to the queue", len(self._undelivered))
            await self._store.write(jobs.return_to_queue, self._undelivered)
        for worker in {lane.worker for lane in self.lanes.all} | {self._home}:
            await worker.close()

    def expected_remaining(self) -> float:
        """Seconds until the first worker is free for the next call."""
        return self.lanes.expected_remaining()

    def note_cancelled(self, job_id: int) -> None:
        """A running job was cancelled: when every job in its call is, stop the call at the
        next step, on its worker, instead of finishing images nobody wants."""
        self._cancelled.add(job_id)
        self.lanes.interrupt(job_id, self._cancelled)

    def ceiling_for(self, key: BatchKey) -> int:
        """The most images one call of this key may hold: MAX_BATCH_SIZE, or fewer where the
        workers (before they open, the bot's runner) measured that fewer fit in device memory."""
        limit = self.lanes.batch_limit(key) if self.lanes.all else self._runner.batch_limit(key)
        largest = self._tuning.max_batch_size
        return largest if limit is None else min(limit, largest)

    async def run_in_worker(self, func: Callable[..., Any], *args: Any) -> Any:
        """Run blocking work on the bot's own runner (model loading) in its thread."""
        return await self._home.run(func, *args)

    async def _drain_forever(self, lane: Lane) -> None:
        """Claim and run batches on one worker until stopped. A failure outside the diffusers
        call (a database error) is logged and the drain resumes: the batch it hit fails its
        jobs with a refund (see `_run_claimed`), and a failed claim is tried again shortly."""
        while not self._stopping:
            await lane.wake.wait()
            lane.wake.clear()
            self.lanes.set_idle(lane, False, self._queue)
            try:
                while not self._stopping and (claimed := await self.claim_next(lane)):
                    await self._run_claimed(lane, *claimed)
                await self._handoff.join()
            except Exception:
                log.exception("the executor's drain failed; retrying in %g s", RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
                lane.wake.set()
                continue
            self.lanes.set_idle(lane, True, self._queue)

    async def claim_next(self, lane: Lane | None = None) -> tuple[int, list[Job]] | None:
        """Claim the call the fair former chose for `lane`'s worker. It chooses inside the
        claim's transaction, so admissions already waiting for the database land first and can
        share the call; where the store disagrees with the index (a job cancelled, changed or
        queued behind its back), the index is rebuilt from the store and the choice made
        again. The models the worker holds go to the queue, which charges a switch of model to
        the member whose call makes it."""
        if not self._queue and await self._store.read(jobs.any_queued):
            await self.reload_queue()  # often a job admitted while we read; cheap when few
        held = frozenset() if lane is None else lane.worker.resident_models()
        while True:
            chosen: list[Job] = []
            claimed = await self._store.write(self._choose_and_claim, chosen, lane, held)
            if not chosen:
                return None
            if claimed is None or len(claimed[1]) != len(chosen):
                await self.reload_queue(out_of_step=True)
            else:
                self._queue.claimed(chosen, held)
            if claimed is not None:
                self.metrics.claimed(claimed[1], self.caps.cap(chosen[0].request.batch_key))
                return claimed

    async def _choose_and_claim(
        self, tx: Tx, chosen: list[Job], lane: Lane | None, held: frozenset[str]
    ) -> tuple[int, list[Job]] | None:
        chosen.extend(await choose_call(tx, self._queue, self.caps.cap, self.lanes, lane, held))
        return await jobs.claim_batch(tx, [job.id for job in chosen]) if chosen else None

    async def reload_queue(self, out_of_step: bool = False) -> None:
        """Load the queue index from the database, the truth (at start-up, after a mismatch)."""
        if out_of_step:
            log.warning("the queue index was out of step with the database; rebuilding it")
        self._queue.load(await self._store.read(jobs.pending))

    async def _run_claimed(self, lane: Lane, batch_id: int, batch: list[Job]) -> None:
        """Run a claimed batch and hand its results to the delivery task; if anything but the
        diffusers call fails, its jobs fail (and are refunded) rather than stay running. A lost
        worker's jobs go back to the queue for the others while it recovers."""
        job_ids = [job.id for job in batch]
        self._undelivered += job_ids
        try:
            results = await self._run_batch(lane, batch_id, batch)
        except WorkerLost as lost:
            log.warning("%s; returning jobs %s to the queue", lost, job_ids)
            results = await return_lost(self._store, batch, self._tuning.max_attempts)
            failed = {result.job.id for result in results}
            self._undelivered = [i for i in self._undelivered if i not in job_ids or i in failed]
            self.metrics.worker_lost(lane.worker.name)
            await self.reload_queue()
            await self.lanes.recover(lane, self._queue)
        except Exception as error:
            log.exception("batch %s (jobs %s) failed; failing its jobs", batch_id, job_ids)
            problem = f"an internal error stopped it ({type(error).__name__})"
            results = [JobResult(job, [], problem, 0.0, batch_id, 0) for job in batch]
        for result in results:
            self._handoff.put(result)

    async def _generate(
        self, lane: Lane, key: BatchKey, specs: list[ImageSpec], owners: list[int]
    ) -> list[GeneratedImage | BaseException]:
        """One result per spec: an image, or the exception that image could not get past.
        Calls run at the key's cap; a failed call is split in halves until the culprit is
        alone, so the other members' images still come out. WorkerLost is raised as it is."""
        cap = self.caps.cap(key)
        if len(specs) > cap:
            results: list[GeneratedImage | BaseException] = []
            for start in range(0, len(specs), cap):
                end = start + cap
                results += await self._generate(lane, key, specs[start:end], owners[start:end])
            return results
        call = Call(key, specs, owners, self._tuning.preview_every, bool(self._progress))
        started = time.perf_counter()
        try:
            report = lane_reporter(lane, owners, self._progress)
            images = list(await lane.worker.generate(call, report))
        except WorkerLost:
            raise
        except Exception as error:
            if isinstance(error, Interrupted):  # asked to stop: no retry, no split
                return [error] * len(specs)
            if is_out_of_memory(error):
                await lane.worker.release_memory()
                cap = self.caps.shrink(key, len(specs))
                log.warning(
                    "out of memory at %d images; cap for this size is now %d", len(specs), cap
                )
            else:
                log.exception("a diffusers call of %d image(s) failed", len(specs))
            if len(specs) == 1:
                return [error]
            half = len(specs) // 2
            first = await self._generate(lane, key, specs[:half], owners[:half])
            return first + await self._generate(lane, key, specs[half:], owners[half:])
        self.caps.succeeded(key)
        seconds = time.perf_counter() - started
        self.metrics.called(lane.worker.name, len(specs), seconds)
        speed_key = SpeedKey(key.model, key.width * key.height, len(specs))
        await self._store.write(speeds.record, speed_key, seconds / key.denoising_steps)
        return images

    async def _run_batch(self, lane: Lane, batch_id: int, batch: list[Job]) -> list[JobResult]:
        """Run a claimed batch on `lane`'s worker and mark it finished: each job's result,
        timed, with the jobs cancelled meanwhile left without images."""
        key = batch[0].request.batch_key
        specs = await image_specs(self._store, batch)
        owners = [job.id for job in batch for _ in range(job.request.count)]
        lane.in_flight = [job.id for job in batch]
        lane.worker.resume()  # an interrupt meant for an earlier batch does not stop this one
        lane.steps = (0, 0)
        lane.busy_since = time.monotonic()
        started = time.perf_counter()
        try:
            outcomes = await self._generate(lane, key, specs, owners)
        finally:
            lane.busy_since = None
            lane.in_flight = []
            self.metrics.busy(lane.worker.name, time.perf_counter() - started)
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
