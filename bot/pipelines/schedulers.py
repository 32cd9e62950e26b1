"""The schedulers members may pick, by the names Discord shows, built fresh for each call."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

# The top-level name is a placeholder that raises when scipy is missing; the real class is here.
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler

from bot.requests import SCHEDULERS

_SCHEDULER_TYPES: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
    "LMS": (LMSDiscreteScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
}


def make_scheduler(name: str, base_config: Any) -> SchedulerMixin:
    """A fresh scheduler for one call, built from the model's own config (betas, offsets), since
    scheduler instances keep per-run state."""
    if name not in _SCHEDULER_TYPES:
        raise ValueError(f"unknown scheduler {name!r}; expected one of: {', '.join(SCHEDULERS)}.")
    cls, overrides = _SCHEDULER_TYPES[name]
    return cls.from_config(base_config, **overrides)


def with_scheduler(
    base: StableDiffusionPipeline,
    name: str,
    cls: type[StableDiffusionPipeline | StableDiffusionImg2ImgPipeline] = StableDiffusionPipeline,
) -> StableDiffusionPipeline | StableDiffusionImg2ImgPipeline:
    """A `cls` pipeline sharing `base`'s modules (no weights copied) with a fresh scheduler;
    not `from_pipe`, which casts the shared modules to float32 unless given a dtype."""
    scheduler = make_scheduler(name, base.scheduler.config)
    pipe = cls(
        **{**base.components, "scheduler": scheduler},
        requires_safety_checker=base.config.requires_safety_checker,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
