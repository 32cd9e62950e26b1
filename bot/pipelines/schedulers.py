"""The schedulers members may pick, by the names Discord shows, built fresh for each call."""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    SchedulerMixin,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)

# The top-level name is a placeholder that raises when scipy is missing; the real class is here.
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler

from bot.pipelines.flow import FLOW_SCHEDULER
from bot.requests import ALL_SCHEDULERS

_SCHEDULER_TYPES: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "Euler": (EulerDiscreteScheduler, {}),
    "DDIM": (DDIMScheduler, {}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": True}),
    "LMS": (LMSDiscreteScheduler, {}),
    "UniPC": (UniPCMultistepScheduler, {}),
    # For LCM models and LCM-LoRAs: 1–8 steps at guidance 1–2.
    "LCM": (LCMScheduler, {}),
    # Flow-matching models (FLUX): Euler over the model's own shifted sigmas.
    FLOW_SCHEDULER: (FlowMatchEulerDiscreteScheduler, {}),
}


def make_scheduler(name: str, base_config: Any) -> SchedulerMixin:
    """A fresh scheduler for one call, built from the model's own config (betas, offsets), since
    scheduler instances keep per-run state."""
    if name not in _SCHEDULER_TYPES:
        raise ValueError(
            f"unknown scheduler {name!r}; expected one of: {', '.join(ALL_SCHEDULERS)}."
        )
    cls, overrides = _SCHEDULER_TYPES[name]
    return cls.from_config(base_config, **overrides)


def with_scheduler(
    base: DiffusionPipeline, name: str, cls: type[DiffusionPipeline] = StableDiffusionPipeline
) -> Any:
    """A `cls` pipeline sharing `base`'s modules (no weights copied) with a fresh scheduler;
    not `from_pipe`, which casts the shared modules to float32 unless given a dtype. `cls` is
    of `base`'s family (SD, SDXL or FLUX); the options `base` was built with carry over."""
    scheduler = make_scheduler(name, base.scheduler.config)
    accepted = inspect.signature(cls.__init__).parameters
    components = {k: v for k, v in base.components.items() if k in accepted}
    options = {k: v for k, v in base.config.items() if k in accepted and k not in base.components}
    if "add_watermarker" in accepted:
        # SDXL's watermark is applied when diffusers decodes; the runner decodes itself.
        options["add_watermarker"] = False
    pipe = cls(**{**components, "scheduler": scheduler}, **options)
    pipe.set_progress_bar_config(disable=True)
    return pipe
