"""Device workers: where the executor's diffusers calls run.

`LocalWorker` is one thread of the bot's own process around the bot's runner (EXECUTOR=local,
today's behaviour); `bot/ray_workers.py` has a Ray actor per GPU (EXECUTOR=ray). The bot stays
the only scheduler and the only SQLite writer: a worker runs the call it is handed, reports its
steps and can be interrupted; one that is lost mid-call raises WorkerLost.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import PIL.Image

from bot.images import png_bytes
from bot.requests import BatchKey, ImageSpec
from bot.results import GeneratedImage, RunnerProgress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepReport:
    """One denoising step of a call as its worker reports it: steps done, steps in all, and
    every few steps a PNG preview per job id (else None)."""

    done: int
    total: int
    previews: dict[int, bytes] | None = None


# How a worker reports its call's steps to the executor: heard on the event loop.
WorkerProgress = Callable[[StepReport], None]

# How the executor tells its listeners (status boards) about a step: (the jobs in the call,
# steps done, steps in all, a PNG preview per job id or None), on the event loop.
ProgressListener = Callable[[list[int], int, int, dict[int, bytes] | None], None]


class WorkerLost(Exception):
    """The worker died during the call (actor error, node lost) or made no step for
    WORKER_TIMEOUT seconds: its jobs go back to the queue and run elsewhere."""


@dataclass(frozen=True)
class Call:
    """One diffusers call as a worker receives it; `owners[i]` is the job of image i, and
    previews are encoded only when someone listens (`previews`)."""

    key: BatchKey
    specs: list[ImageSpec]
    owners: list[int]
    preview_every: int = 0
    previews: bool = False


def preview_pngs(owners: list[int], previews: list[PIL.Image.Image]) -> dict[int, bytes]:
    """Each job's first preview image as a PNG; `owners[i]` is the job of image i."""
    firsts: dict[int, PIL.Image.Image] = {}
    for owner, image in zip(owners, previews, strict=True):
        firsts.setdefault(owner, image)
    return {owner: png_bytes(image) for owner, image in firsts.items()}


def step_reporter(call: Call, send: WorkerProgress) -> RunnerProgress:
    """The runner's step callback for `call`: previews become small PNGs where the call runs
    (the worker's thread or process), then `send` passes the step on."""

    def report(done: int, total: int, previews: list[PIL.Image.Image] | None = None) -> None:
        pngs = preview_pngs(call.owners, previews) if previews and call.previews else None
        send(StepReport(done, total, pngs))

    return report


class Runner(Protocol):
    """What the executor needs from the pipelines: one call, one image per spec, in order;
    `progress(done, total, previews)` after each step, with previews every few steps."""

    def generate(
        self,
        key: BatchKey,
        specs: list[ImageSpec],
        *,
        progress: RunnerProgress | None = None,
        preview_every: int = 0,
    ) -> Sequence[GeneratedImage]: ...

    def resident_models(self) -> frozenset[str]: ...

    def release_memory(self) -> None: ...

    def batch_limit(self, key: BatchKey) -> int | None: ...

    def interrupt(self) -> None: ...

    def resume(self) -> None: ...


def is_out_of_memory(error: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError and its MPS/CPU cousins, without importing torch here."""
    return type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()


def describe_error(error: BaseException) -> str:
    if is_out_of_memory(error):
        return "the image did not fit in GPU memory even alone; try a smaller size"
    return f"{type(error).__name__}: {error}"


class ProgressListeners:
    """Fans one executor's progress out to whoever listens (status boards); with nobody
    listening it is empty, and the workers then skip encoding previews."""

    def __init__(self) -> None:
        self._listeners: list[ProgressListener] = []

    def add(self, listener: ProgressListener) -> None:
        self._listeners.append(listener)

    def remove(self, listener: ProgressListener) -> None:
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


class Worker(Protocol):
    """What the executor needs from a device: one call at a time, interruptible."""

    name: str

    async def open(self) -> None: ...

    async def generate(self, call: Call, report: WorkerProgress) -> Sequence[GeneratedImage]: ...

    def resident_models(self) -> frozenset[str]: ...

    def batch_limit(self, key: BatchKey) -> int | None: ...

    def resume(self) -> None: ...

    def interrupt(self) -> None: ...

    async def release_memory(self) -> None: ...

    async def recover(self) -> None: ...

    async def close(self) -> None: ...


@dataclass(eq=False)
class Lane:
    """One worker and what it is doing; the executor keeps one call in flight per lane."""

    worker: Worker
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    idle: bool = True
    in_flight: list[int] = field(default_factory=list)  # the jobs of the call running now
    steps: tuple[int, int] = (0, 0)
    busy_since: float | None = None
    up: bool = True  # False while its lost worker restarts

    def free_in(self) -> float:
        """Seconds until this lane can take a call: 0 when idle, from its steps when busy, and
        never (inf) when that cannot be told yet or its worker is restarting."""
        if not self.up:
            return math.inf
        if self.busy_since is None:
            return 0.0
        return self.expected_remaining() if self.steps[0] else math.inf

    def expected_remaining(self) -> float:
        """Seconds the running call still needs, extrapolated from its steps so far."""
        done, total = self.steps
        if self.busy_since is None or done == 0:
            return 0.0
        return (time.monotonic() - self.busy_since) * (total - done) / done


def lane_reporter(
    lane: Lane, owners: list[int], listener: ProgressListener | None
) -> WorkerProgress:
    """A step report from the lane's worker, heard on the event loop: the lane's steps (for
    ETAs), then the listeners, if any."""
    job_ids = list(dict.fromkeys(owners))

    def report(step: StepReport) -> None:
        lane.steps = (step.done, step.total)
        if listener:  # None, or nobody listening: nothing to tell
            listener(job_ids, step.done, step.total, step.previews)

    return report


class Lanes:
    """The executor's lanes, one per worker, and when they are all idle."""

    def __init__(self) -> None:
        self.all: list[Lane] = []
        self.idle = asyncio.Event()

    def __iter__(self) -> Iterator[Lane]:
        return iter(self.all)

    async def open(self, open_workers: Callable[[], Sequence[Worker]]) -> None:
        """A lane per worker, once every worker is ready; a failure is logged here, since no
        call would ever run (the task that opens them has nobody awaiting it)."""
        try:
            workers = await asyncio.to_thread(open_workers)
            await asyncio.gather(*(worker.open() for worker in workers))
        except Exception:
            log.exception("the workers could not be opened; no job will run")
            raise
        self.all = [Lane(worker) for worker in workers]

    def resident_models(self) -> frozenset[str]:
        """The models loaded now on any worker."""
        return frozenset().union(*(lane.worker.resident_models() for lane in self.all))

    def wake(self) -> None:
        self.idle.clear()
        for lane in self.all:
            lane.wake.set()

    def set_idle(self, lane: Lane, idle: bool, queue: Sized) -> None:
        """Idle when the queue is empty and every lane is idle (or recovering its worker), with
        no wake-up still due (a job admitted during the last claim)."""
        lane.idle = idle
        others = all(other.idle and not other.wake.is_set() for other in self.all)
        if idle and not queue and others:
            self.idle.set()

    async def recover(self, lane: Lane, queue: Sized) -> None:
        """The other lanes take a lost worker's jobs (back in `queue`) while it restarts."""
        self.wake()
        lane.wake.clear()
        self.set_idle(lane, True, queue)
        lane.up = False
        await lane.worker.recover()
        lane.up = True
        self.set_idle(lane, False, queue)

    def expected_remaining(self) -> float:
        """Seconds until the first worker is free for the next call."""
        return min((lane.expected_remaining() for lane in self.all), default=0.0)

    def others_free_in(self, lane: Lane, model: str) -> float:
        """Seconds until a lane other than `lane` whose worker holds `model` can take a call;
        inf when there is none (a model load would cost more than sharing a call saves)."""
        others = [o for o in self.all if o is not lane and model in o.worker.resident_models()]
        return min((other.free_in() for other in others), default=math.inf)

    def batch_limit(self, key: BatchKey) -> int | None:
        """Images of `key` that fit at once on every worker (the batch former does not pick
        the worker, so the smallest device decides); None where no worker measured any."""
        limits = [limit for lane in self.all if (limit := lane.worker.batch_limit(key))]
        return min(limits, default=None)

    def interrupt(self, job_id: int | None, cancelled: set[int]) -> None:
        """Interrupt every call (None), or the call of `job_id` once all its jobs are
        `cancelled`."""
        for lane in self.all:
            if job_id is None or (job_id in lane.in_flight and cancelled >= set(lane.in_flight)):
                lane.worker.interrupt()


class LocalWorker:
    """The bot's runner in a thread of this process: the event loop never waits on torch."""

    def __init__(self, runner: Any, name: str = "local") -> None:
        self.runner = runner
        self.name = name
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-worker")

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        """Blocking device work (loading a model, a diffusers call) in this worker's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._thread, func, *args)

    async def open(self) -> None:
        return None

    async def generate(self, call: Call, report: WorkerProgress) -> Sequence[GeneratedImage]:
        loop = asyncio.get_running_loop()
        step = step_reporter(call, functools.partial(loop.call_soon_threadsafe, report))
        generate = functools.partial(
            self.runner.generate,
            call.key,
            call.specs,
            progress=step,
            preview_every=call.preview_every,
        )
        return list(await self.run(generate))

    def resident_models(self) -> frozenset[str]:
        return frozenset(self.runner.resident_models())

    def batch_limit(self, key: BatchKey) -> int | None:
        return self.runner.batch_limit(key)

    def resume(self) -> None:
        self.runner.resume()

    def interrupt(self) -> None:
        self.runner.interrupt()

    async def release_memory(self) -> None:
        await self.run(self.runner.release_memory)

    async def recover(self) -> None:
        return None

    async def close(self) -> None:
        await asyncio.to_thread(self._thread.shutdown, wait=True, cancel_futures=True)
