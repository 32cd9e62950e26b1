"""Queue ETAs from measured speed: the cost units ahead of a job (kept by bot/queue.py as a
running sum, never replayed) times the seconds a unit takes at the speed seen so far."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from bot.requests import UNIT_WORK

# The unit's shape: UNIT_WORK is one 512×512 image denoised for 25 steps.
UNIT_PIXELS = 512 * 512
UNIT_STEPS = UNIT_WORK // UNIT_PIXELS

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


def seconds_per_unit(speeds: Mapping[SpeedKey, float], model: str, images: int) -> float | None:
    """Measured seconds one cost unit (a 512×512 image at 25 steps) takes when calls hold
    `images` images: what the work ahead of a job costs at the device's batched speed."""
    images = max(1, images)
    per_step = seconds_per_step(speeds, SpeedKey(model, UNIT_PIXELS, images))
    return None if per_step is None else per_step * UNIT_STEPS / images


def wait_seconds(units: float, per_unit: float | None, busy_for: float = 0.0) -> float | None:
    """Seconds until `units` of queued work (a job's own and everything ahead of it) are done
    after the running call's remaining `busy_for`; None before anything was measured."""
    return None if per_unit is None else busy_for + units * per_unit
