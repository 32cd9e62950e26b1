"""Queue ETAs from measured speed: replay the batch former over the jobs ahead and add up
how long each of those diffusers calls takes at the speed seen so far."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bot.batching import form_batch
from bot.requests import Job

# Weight of the newest measurement in the moving average.
SMOOTHING = 0.3


@dataclass(frozen=True)
class SpeedKey:
    """Speed depends on the model, the pixels per image and how many images share a call."""

    model: str
    pixels: int
    images: int


def blend(previous: float | None, measured: float) -> float:
    """Exponential moving average, so one slow call (a cold start) fades out."""
    return measured if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * measured


def seconds_per_step(speeds: Mapping[SpeedKey, float], key: SpeedKey) -> float | None:
    """Measured seconds per denoising step of a call; unmeasured shapes are scaled from the
    nearest measurement of the same model by pixels × images (work grows about linearly)."""
    if key in speeds:
        return speeds[key]
    same_model = [(k, v) for k, v in speeds.items() if k.model == key.model]
    if not same_model:
        return None
    work = key.pixels * key.images
    nearest, speed = min(same_model, key=lambda kv: abs(kv[0].pixels * kv[0].images - work))
    return speed * work / (nearest.pixels * nearest.images)


def call_seconds(speeds: Mapping[SpeedKey, float], batch: Sequence[Job]) -> float | None:
    request = batch[0].request
    images = sum(job.request.count for job in batch)
    per_step = seconds_per_step(
        speeds, SpeedKey(request.model, request.width * request.height, images)
    )
    if per_step is None:
        return None
    return per_step * request.batch_key.denoising_steps


def estimate_waits(
    queued: Sequence[Job],
    speeds: Mapping[SpeedKey, float],
    max_images: int,
    busy_for: float = 0.0,
) -> dict[int, float | None]:
    """Seconds until each queued job's images are done, assuming no one else arrives.
    `busy_for` is the expected remaining time of the batch running now. None: no estimate yet."""
    waits: dict[int, float | None] = {}
    pending = list(queued)
    elapsed: float | None = busy_for
    while pending:
        batch = form_batch(pending, max_images)
        seconds = call_seconds(speeds, batch)
        elapsed = None if elapsed is None or seconds is None else elapsed + seconds
        for job in batch:
            waits[job.id] = elapsed
        taken = {job.id for job in batch}
        pending = [job for job in pending if job.id not in taken]
    return waits
