"""One home for what many tests build: requests and jobs with defaults, an image's pixels,
and a clock the test moves by hand."""

from __future__ import annotations

import io
from dataclasses import replace
from typing import Any

import numpy as np
from PIL import Image

from bot.requests import GenerationRequest, Job


def make_request(**overrides: Any) -> GenerationRequest:
    """A valid request (prompt "p", seed 1, 20 Euler steps at 7.5, one 512×512 image of model
    "m") with `overrides` applied."""
    fields: dict[str, Any] = {
        "prompt": "p",
        "seed": 1,
        "steps": 20,
        "guidance": 7.5,
        "width": 512,
        "height": 512,
        "scheduler": "Euler",
        "count": 1,
        "model": "m",
        **overrides,
    }
    return GenerationRequest(**fields)


def make_job(
    job_id: int,
    request: GenerationRequest | None = None,
    *,
    queued_at: float | None = None,
    **changes: Any,
) -> Job:
    """Job `job_id` of member `job_id` in guild 1, channel 1, queued at `job_id` seconds unless
    `queued_at` says otherwise; `changes` apply to `request` (default: `make_request()`)."""
    return Job(
        job_id,
        member_id=job_id,
        guild_id=1,
        channel_id=1,
        request=replace(request or make_request(), **changes),
        queued_at=float(job_id if queued_at is None else queued_at),
    )


def pixels(source: Any) -> np.ndarray:
    """An image's RGB pixels as int16, so that differences between two images do not wrap.
    `source`: a PIL image, encoded bytes, a generated image (`.image`) or an attachment
    (`.data`)."""
    if not isinstance(source, Image.Image | bytes):
        source = source.image if hasattr(source, "image") else source.data
    if isinstance(source, bytes):
        source = Image.open(io.BytesIO(source))
    return np.asarray(source.convert("RGB"), dtype=np.int16)


class Clock:
    """Stands in for `time.time`: reads `now`, which the test moves (`clock.now += 60`);
    with `tick`, every read first advances it by that much."""

    def __init__(self, now: float = 0.0, tick: float = 0.0) -> None:
        self.now = now
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now
