"""Ray workers (EXECUTOR=ray): a Ray actor per GPU, or per CPU core with RAY_WORKERS, each
holding its own runner and resident models. The bot awaits each call's object ref as it awaits a
thread, asks the actor for the call's steps as they come, and interrupts the call there. Ray is
imported only here (the optional extra), and torch only inside the actor, by the runner.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bot.ray_cluster import connect_ray
from bot.requests import BatchKey
from bot.results import GeneratedImage
from bot.workers import Call, StepReport, WorkerLost, WorkerProgress, step_reporter

log = logging.getLogger(__name__)

# What a worker's device holds, sent with every answer: (resident models, memory probe's fit
# per model measured, as bot.pipelines.devices.MemoryFit; empty off CUDA).
Holdings = tuple[frozenset[str], dict[str, Any]]

# A Ray worker's progress is asked for with a call that returns at its next step, or after
# POLL_SECONDS without one; asked at most every POLL_SPACING seconds, so fast steps (a small
# model, a CPU) arrive a few at a time instead of costing a round trip each. The status board
# shows steps every 0.5 s (cogs/admission.py's FLUSH_INTERVAL): two asks per showing keep what
# it shows at most a quarter of a second old.
POLL_SECONDS = 1.0
POLL_SPACING = 0.25


class DeviceHost:
    """The body of a Ray worker actor: a runner on the actor's device, its resident models, and
    the steps of the running call until the bot asks for them. Methods run on the actor's
    threads (max_concurrency), so `progress` and `interrupt` reach a call while it runs."""

    def __init__(self, options: Any, catalog: Any, models: Sequence[str]) -> None:
        from bot.pipelines import PipelineRunner

        self._runner = PipelineRunner(options, catalog)
        for model in models:
            self._runner.load(model)
        self._changed = threading.Condition()
        self._steps: list[StepReport] = []
        self._finished = 0  # the id of the last call that ended
        self._batch = 0
        self._stopped: set[int] = set()

    def ready(self) -> tuple[int, Holdings]:
        """(the actor's process id, what its device holds), once its models are loaded."""
        return os.getpid(), self._holdings()

    def _holdings(self) -> Holdings:
        """The resident models and, on a GPU, what the memory probe found fits for each."""
        return self._runner.resident_models(), self._runner.memory_fits()

    def generate(
        self, call: Call, call_id: int, batch: int
    ) -> tuple[list[GeneratedImage], list[StepReport], Holdings]:
        """Run the call; returns its images, the steps not yet asked for, and what the device
        holds now (a model loaded for the call, and measured, or another unloaded)."""
        with self._changed:
            self._steps.clear()
            self._batch = batch
            self._stopped = {stopped for stopped in self._stopped if stopped >= batch}
            (self._runner.interrupt if batch in self._stopped else self._runner.resume)()
        try:
            images = self._runner.generate(
                call.key,
                call.specs,
                progress=step_reporter(call, self._note),
                preview_every=call.preview_every,
            )
        finally:
            with self._changed:
                self._finished = call_id
                unread, self._steps = self._steps, []
                self._changed.notify_all()
        return list(images), unread, self._holdings()

    def _note(self, step: StepReport) -> None:
        with self._changed:
            self._steps.append(step)
            self._changed.notify_all()

    def progress(self, call_id: int, wait: float) -> tuple[list[StepReport], bool]:
        """The steps since the last ask, returned at the next step (or after `wait` seconds),
        and whether call `call_id` has ended."""
        with self._changed:
            self._changed.wait_for(lambda: self._steps or self._finished >= call_id, wait)
            steps, self._steps = self._steps, []
            return steps, self._finished >= call_id

    def interrupt(self, batch: int) -> None:
        """Stop the calls of executor batch `batch`, now or when they start."""
        with self._changed:
            self._stopped.add(batch)
            if self._batch == batch:
                self._runner.interrupt()

    def release_memory(self) -> None:
        self._runner.release_memory()


@dataclass(frozen=True)
class RayPlan:
    """How many Ray workers to start and what each one asks Ray for."""

    workers: int
    gpus: bool


def ray_plan(gpus: float, ray_workers: int | None) -> RayPlan:
    """One worker per GPU of the cluster; RAY_WORKERS CPU workers (one core and one torch
    thread each) where it has none, for trials and tests."""
    if gpus >= 1:
        return RayPlan(ray_workers or int(gpus), True)
    return RayPlan(ray_workers or 1, False)


class RayWorker:
    """A Ray actor running calls; the executor awaits its object refs as it awaits a thread.
    The actor is restarted by Ray when it dies; `recover` waits for that."""

    def __init__(
        self, name: str, host_args: tuple[Any, ...], actor_options: dict[str, Any], timeout: float
    ) -> None:
        self.name = name
        self._host_args = host_args
        self._actor_options = actor_options
        self._timeout = timeout
        self._actor: Any = None
        self._resident: frozenset[str] = frozenset()
        self._fits: dict[str, Any] = {}
        self._calls = 0
        self._batch = 0
        self._heard = 0.0  # event-loop time of the running call's start or latest step
        self.pid: int | None = None

    async def open(self) -> None:
        import ray

        actor_class = ray.remote(DeviceHost).options(**self._actor_options)
        self._actor = actor_class.remote(*self._host_args)
        await self._ready()

    async def _ready(self) -> None:
        """Until the actor has started and loaded its models, however long that takes (a model
        to load, or no free GPU in the cluster: said in the log every minute)."""
        ready = asyncio.wrap_future(self._actor.ready.remote().future())
        while True:
            try:
                self.pid, holdings = await asyncio.wait_for(asyncio.shield(ready), 60)
                self._resident, self._fits = holdings
                return
            except TimeoutError:
                log.warning(
                    "%s has not started yet; does the Ray cluster have a free GPU?", self.name
                )

    async def generate(self, call: Call, report: WorkerProgress) -> Sequence[GeneratedImage]:
        """Run `call` on the actor, passing its steps to `report` as they come; WorkerLost
        when the actor dies or goes silent, the call's own error as if it had run here."""
        import ray

        self._calls += 1
        call_id = self._calls
        done = asyncio.wrap_future(self._actor.generate.remote(call, call_id, self._batch).future())
        self._heard = asyncio.get_running_loop().time()
        poller = asyncio.create_task(self._poll(call_id, report))
        try:
            images, unread, (self._resident, self._fits) = await self._unless_silent(done)
        except TimeoutError:
            ray.kill(self._actor, no_restart=False)  # Ray starts it again; its call is dropped
            raise WorkerLost(f"{self.name} made no step for {self._timeout:g} s") from None
        except ray.exceptions.RayTaskError as error:  # the call itself failed: as if local
            raise error.cause from None
        except ray.exceptions.RayError as error:
            raise WorkerLost(f"{self.name} was lost: {type(error).__name__}") from error
        finally:
            poller.cancel()
        for step in unread:
            report(step)
        return images

    async def _unless_silent(self, done: asyncio.Future[Any]) -> Any:
        """The call's answer; TimeoutError once it has gone WORKER_TIMEOUT seconds without a
        step (before its first: a model load). A long call that keeps stepping is not cut
        short, and a hung one is found that long after its last step, however big it is. The
        actor answering progress asks is no sign of life: its GPU may be stuck."""
        loop = asyncio.get_running_loop()
        while (quiet := loop.time() - self._heard) < self._timeout:
            await asyncio.wait([done], timeout=self._timeout - quiet)
            if done.done():
                return done.result()
        done.cancel()
        raise TimeoutError

    async def _poll(self, call_id: int, report: WorkerProgress) -> None:
        """Pass the call's steps on as they come, until it ends (or the actor is lost)."""
        loop = asyncio.get_running_loop()
        try:
            finished = False
            while not finished:
                ref = self._actor.progress.remote(call_id, POLL_SECONDS)
                steps, finished = await asyncio.wrap_future(ref.future())
                if steps:
                    self._heard = loop.time()
                for step in steps:
                    report(step)
                if not finished:
                    await asyncio.sleep(POLL_SPACING)
        except Exception:  # the call's own await reports a lost actor
            return

    def resident_models(self) -> frozenset[str]:
        return self._resident

    def batch_limit(self, key: BatchKey) -> int | None:
        """From the actor's own memory probe (its GPU), as the local runner answers."""
        fit = self._fits.get(key.model)
        return None if fit is None else fit.images_that_fit(key.width * key.height)

    def resume(self) -> None:
        self._batch += 1  # interrupts name the batch, so one meant for the last never stops this

    def interrupt(self) -> None:
        if self._actor is not None:
            self._actor.interrupt.remote(self._batch)

    async def release_memory(self) -> None:
        await asyncio.wrap_future(self._actor.release_memory.remote().future())

    async def recover(self) -> None:
        """Until Ray has the actor running again (its models loaded)."""
        import ray

        while True:
            try:
                await self._ready()
                return
            except ray.exceptions.RayError:
                log.warning("%s is not back yet", self.name)
                await asyncio.sleep(1.0)

    async def close(self) -> None:
        import ray

        if self._actor is not None:
            ray.kill(self._actor, no_restart=True)


def ray_workers(
    options: Any,
    catalog: Any,
    models: Sequence[str],
    *,
    address: str | None,
    count: int | None,
    timeout: float,
) -> list[RayWorker]:
    """The Ray workers of the cluster (joined, or started here: bot/ray_cluster.py): one per
    GPU, or `count` CPU workers where it has no GPU. Each holds a runner built from `options`
    with `models` loaded; Ray restarts one that dies."""
    ray = connect_ray(address, count)
    plan = ray_plan(ray.cluster_resources().get("GPU", 0), count)
    # Three threads: a call, its progress and its interrupt. Ray sets OMP_NUM_THREADS to the
    # actor's num_cpus, so a CPU worker's torch runs one thread.
    actor_options = {
        "max_concurrency": 3,
        "max_restarts": -1,
        "num_cpus": 1,
        "num_gpus": 1 if plan.gpus else 0,
    }
    return [
        RayWorker(f"ray-{index}", (options, catalog, tuple(models)), actor_options, timeout)
        for index in range(plan.workers)
    ]


def workers_for(settings: Any, runner: Any, catalog: Any) -> Callable[[], list[Any]] | None:
    """How the executor opens its workers: None for EXECUTOR=local (a thread around `runner`),
    else the Ray workers, each with its own runner built like `runner` but on DEVICE (the bot's
    own runner only needs to count prompt tokens), with the default model loaded; opened from
    the executor's start, since joining a cluster takes seconds."""
    if settings.executor != "ray":
        return None
    return functools.partial(
        ray_workers,
        replace(runner.options, device=settings.device),
        catalog,
        [catalog.default],
        address=settings.ray_address,
        count=settings.ray_workers,
        timeout=settings.worker_timeout,
    )
