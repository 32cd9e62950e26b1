"""What the torch-side benchmarks share: the bot wired as in production, a stand-in for the
Discord cog that encodes PNGs, and an event-loop stall meter."""

from __future__ import annotations

import os

# Before diffusers/huggingface_hub are imported: benchmarks never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import asyncio
import contextlib
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diffusers
import torch
import transformers

from bot.__main__ import open_service
from bot.executor import JobResult
from bot.images import grid, parameters_text, png_bytes
from bot.intake import Intake
from bot.requests import GenerationRequest, RawOptions
from bot.service import ImagineService
from bot.settings import Settings, load_settings


def quiet_libraries() -> None:
    """Progress bars and load-time warnings would drown the tables."""
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def bench_settings(
    folder: Path, *, model_id: str, device: str, overrides: Mapping[str, str] | None = None
) -> Settings:
    """Settings read the way the bot reads them, from variables, with the database and model
    cache in `folder`, sizes from 64 to 1024 pixels and no safety checker (the random-weight
    models have none). `overrides` are more variables, e.g. {"MAX_BATCH_SIZE": "1"}."""
    environ = {
        "MODEL_ID": model_id,
        "DATABASE_PATH": str(folder / "bench.sqlite3"),
        "MODEL_CACHE": str(folder / "models"),
        "MODELS_FILE": str(folder / "models.toml"),  # none: the one model MODEL_ID
        "DEVICE": device,
        "SAFETY_CHECKER": "false",
        "MIN_SIZE": "64",
        "MAX_SIZE": "1024",
        "MAX_STEPS": "50",
        "MAX_IMAGES_PER_REQUEST": "4",
        **(overrides or {}),
    }
    return load_settings(environ, env_file=None, require_token=False)


def encode_pngs(result: JobResult) -> int:
    """What the cog does before uploading: a grid when there are several images, then one PNG
    per image carrying its parameters. Returns the bytes produced."""
    request = result.job.request
    images = [generated.image for generated in result.images]
    total = len(png_bytes(grid(images))) if len(images) > 1 else 0
    for seed, image in zip(request.seeds, images, strict=True):
        total += len(png_bytes(image, parameters_text(request, seed)))
    return total


@dataclass
class Probe:
    """Stands in for the Discord cog and watches the device: encodes PNGs in a thread as the
    cog does, optionally waits `upload_seconds` per job as the cog waits on its upload, and
    notes when each job was delivered and when each diffusers call started and ended."""

    upload_seconds: float = 0.0
    delivered: dict[int, tuple[float, int, int]] = field(default_factory=dict)
    calls: list[tuple[float, float]] = field(default_factory=list)

    def watch(self, runner: Any) -> None:
        """Time every call the executor's thread makes into the runner."""
        generate = runner.generate

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return generate(*args, **kwargs)
            finally:
                self.calls.append((start, time.perf_counter()))

        runner.generate = timed

    async def __call__(self, result: JobResult) -> None:
        if result.error is not None:
            raise RuntimeError(f"job {result.job.id} failed: {result.error}")
        await asyncio.to_thread(encode_pngs, result)
        if self.upload_seconds:
            await asyncio.sleep(self.upload_seconds)
        self.delivered[result.job.id] = (time.perf_counter(), result.batch_id, result.batch_images)


class StallMeter:
    """Longest gap between wake-ups of a coroutine sleeping 10 ms: how long the event loop (and
    so Discord's heartbeat) could not run anything. The gap includes the 10 ms sleep."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self.longest = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StallMeter:
        self._task = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self.interval)
            now = time.perf_counter()
            self.longest = max(self.longest, now - last)
            last = now


@dataclass
class ServiceRun:
    """Jobs through the service: wall time, each job's latency, the batches made, and the time
    spent inside diffusers calls (the rest is our machinery, or the device waiting)."""

    seconds: float
    latencies: list[float]
    images: int
    batch_sizes: list[int]
    calls: int
    in_calls: float
    requests: list[GenerationRequest] = field(default_factory=list)


async def start_service(settings: Settings, probe: Probe) -> ImagineService:
    """The store, runner and executor exactly as `python -m bot` wires them, model loaded."""
    service = await open_service(settings)
    probe.watch(service.runner)
    service.add_listener(probe)
    await service.start()
    return service


async def run_jobs(
    service: ImagineService,
    probe: Probe,
    raws: Sequence[RawOptions],
    offsets: Sequence[float] | None = None,
    init_pngs: Sequence[bytes | None] | None = None,
) -> ServiceRun:
    """Submit every job at once (a burst of members) or each at its offset in seconds from now,
    then wait until all are delivered. Latency runs from a job's arrival to its delivery.
    `init_pngs[i]`, where given, makes job i an image-to-image job on that upload."""
    start = time.perf_counter()
    arrived: dict[int, float] = {}
    requests: list[GenerationRequest] = []

    async def arrive(index: int, raw: RawOptions) -> None:
        if offsets is not None:
            await asyncio.sleep(max(0.0, start + offsets[index] - time.perf_counter()))
        now = time.perf_counter()
        upload = None if init_pngs is None else init_pngs[index]
        image = None if upload is None else await service.prepare_init_image(upload)
        request = service.validate(raw, image)
        admission = await service.submit(request, Intake(index), image)
        arrived[admission.job.id] = now
        requests.append(request)

    await asyncio.gather(*(arrive(i, raw) for i, raw in enumerate(raws)))
    await service.executor.wait_idle()
    done = {job_id: probe.delivered[job_id] for job_id in arrived}
    batches = {batch_id: images for _, batch_id, images in done.values()}
    return ServiceRun(
        seconds=max(when for when, _, _ in done.values()) - start,
        latencies=[done[job_id][0] - arrived[job_id] for job_id in arrived],
        images=sum(batches.values()),
        batch_sizes=list(batches.values()),
        calls=sum(begin >= start for begin, _ in probe.calls),
        in_calls=sum(end - begin for begin, end in probe.calls if begin >= start),
        requests=requests,
    )


def environment() -> dict[str, Any]:
    """What the numbers were measured on; GPU figures only mean something with the GPU named."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # Other processes on the machine skew CPU timings badly; this says whether there were.
        "load_average_1_5_15_min": os.getloadavg(),
    }
