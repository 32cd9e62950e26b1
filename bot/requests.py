"""What a member may ask for: request types, limits and validation.

Pure Python on purpose: no torch, no discord, so the rules are testable on their own
and the same checks guard slash commands, buttons and the command line.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any

# The schedulers by the names members pick live with the families they apply to.
from bot.families import ALL_SCHEDULERS as ALL_SCHEDULERS
from bot.families import DEFAULT_SCHEDULER as DEFAULT_SCHEDULER
from bot.families import SCHEDULERS as SCHEDULERS
from bot.families import family_name, schedulers_for

if TYPE_CHECKING:
    from bot.models import Catalog


MAX_SEED = 2**32 - 1
MAX_PROMPT_CHARS = 1500
SIZE_STEP = 8
# One unit of device work, the measure of quotas, fair share and the per-request cap: one
# 512×512 image denoised for 25 steps. Work grows about linearly in pixels and steps.
UNIT_WORK = 512 * 512 * 25


class InvalidRequest(ValueError):
    """A member's option is out of bounds; the message names the option and what is allowed."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"`{option}`: {message}")
        self.option = option


@dataclass(frozen=True)
class Limits:
    """Bounds a server owner sets; members are held to them before anything is queued."""

    max_steps: int = 50
    min_side: int = 256
    max_side: int = 1024
    max_count: int = 4
    max_guidance: float = 30.0
    default_steps: int = 25
    default_guidance: float = 7.5
    default_width: int = 512
    default_height: int = 512
    default_strength: float = 0.6
    default_scheduler: str = DEFAULT_SCHEDULER
    size_step: int = SIZE_STEP  # sides are multiples of it: the model family's patch grid


@dataclass(frozen=True)
class BatchKey:
    """Everything one diffusers call takes as a single value; jobs share a call only if equal."""

    model: str
    mode: str
    width: int
    height: int
    steps: int
    scheduler: str
    # Guidance scales vary per image (`ImageSpec.guidance`); only whether they run classifier-free
    # guidance (scale > 1) is shared, since without it the call skips the unconditional pass.
    cfg: bool = True
    # Mode "image": the steps denoised from the init image, int(steps × strength). The strength
    # decides nothing else in diffusers' img2img, so strengths with the same count share a call.
    image_steps: int | None = None
    # The LoRAs fused into the model for this call, (name, weight) sorted by name: one set per
    # call, applied once per call, never per image.
    loras: tuple[tuple[str, float], ...] = ()

    @property
    def denoising_steps(self) -> int:
        """The denoising steps this key's call really runs (see `denoising_steps`)."""
        return self.steps if self.image_steps is None else self.image_steps


def denoising_steps(steps: int, strength: float | None) -> int:
    """Steps a call really denoises: all of them, or from an init image the last
    int(steps × strength), as diffusers' img2img counts them; 0 means none, which is refused."""
    return steps if strength is None else int(steps * strength)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request: every parameter that decides the pixels, nothing about Discord."""

    prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str
    count: int
    model: str
    negative_prompt: str = ""
    mode: str = "text"
    strength: float | None = None
    # For mode "image" and "inpaint": the SHA-256 of the stored init image (PNG), which varies
    # per image.
    init_image_hash: str | None = None
    # LoRAs as (name, weight), sorted by name; part of the batch key.
    loras: tuple[tuple[str, float], ...] = ()
    # For mode "inpaint": (left, top, right, bottom) of the pixels kept from the init image;
    # everything outside the box is painted anew (Zoom Out, Pan).
    keep_box: tuple[int, int, int, int] | None = None
    # What made this request from its parent ("upscale-subtle", "zoom-2", "pan-right", ...), or
    # None for a plain generation or variation; shown in history and on the result.
    operation: str | None = None

    @cached_property  # a request never changes; the queue index asks for these often
    def batch_key(self) -> BatchKey:
        image_steps = None if self.strength is None else denoising_steps(self.steps, self.strength)
        return BatchKey(
            model=self.model,
            mode=self.mode,
            width=self.width,
            height=self.height,
            steps=self.steps,
            scheduler=self.scheduler,
            cfg=self.guidance > 1,
            image_steps=image_steps,
            loras=self.loras,
        )

    @cached_property
    def cost(self) -> float:
        """Device work in units (`UNIT_WORK`): images × pixels × the steps really denoised.
        Rounded to thousandths so sums in the ledger stay exact."""
        steps = denoising_steps(self.steps, self.strength)
        return round(self.count * self.width * self.height * steps / UNIT_WORK, 3)

    @property
    def seeds(self) -> list[int]:
        """A job of count n uses seeds s, s+1, ... s+n-1."""
        return [self.seed + i for i in range(self.count)]


@dataclass(frozen=True)
class ImageSpec:
    """One image inside a diffusers call: the parts that may differ within a batch."""

    prompt: str
    negative_prompt: str
    seed: int
    # The classifier-free guidance scale, above 1 exactly when the batch key's `cfg` is true.
    guidance: float = 7.5
    # A PIL image (RGB, the batch key's size) for mode "image"; Any keeps PIL out of here.
    # Left out of the hash: images are unhashable, and specs differ by seed anyway.
    init_image: Any = field(default=None, hash=False)
    # Mode "inpaint": the box of `init_image` kept as it is (see GenerationRequest.keep_box).
    keep_box: tuple[int, int, int, int] | None = None


@dataclass
class RawOptions:
    """Options as they arrive from Discord or the command line, before any checking."""

    prompt: Any
    seed: Any = None
    negative_prompt: Any = None
    steps: Any = None
    guidance: Any = None
    width: Any = None
    height: Any = None
    scheduler: Any = None
    count: Any = None
    strength: Any = None
    model: Any = None  # a name from the owner's allowlist (bot/models.py)
    loras: Any = None  # LoRAs as "name:weight" words, or (name, weight) pairs


def _integer(option: str, value: Any, low: int, high: int, *, default: int | None = None) -> int:
    """A whole number from `low` to `high`, or `default`: options arrive as floats and bools too."""
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest(option, f"must be a whole number from {low} to {high}.")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise InvalidRequest(option, f"must be a whole number from {low} to {high}.")
        value = int(value)
    if not low <= value <= high:
        raise InvalidRequest(option, f"must be from {low} to {high}, got {value}.")
    return value


def _text(option: str, value: Any, *, required: bool) -> str:
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise InvalidRequest(option, "must be text.")
    cleaned = "".join(ch for ch in value if ch.isprintable() or ch == " ").strip()
    if required and not cleaned:
        raise InvalidRequest(option, "must not be empty.")
    if len(cleaned) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            option, f"is {len(cleaned)} characters long; at most {MAX_PROMPT_CHARS} are allowed."
        )
    return cleaned


def _side(option: str, value: Any, default: int, limits: Limits) -> int:
    if value is None:
        return default
    side = _integer(option, value, limits.min_side, limits.max_side)
    if side % limits.size_step:
        raise InvalidRequest(
            option,
            f"must be a multiple of {limits.size_step} from {limits.min_side} to "
            f"{limits.max_side}, got {side}.",
        )
    return side


def _negative(prefix: str, member: str) -> str:
    """The model's negative prompt before the member's; a request made from one that has it
    already (a variation, an image's parameters) does not get it twice."""
    if not prefix or member == prefix or member.startswith(f"{prefix}, "):
        return member
    return f"{prefix}, {member}" if member else prefix


def fitted_size(width: int, height: int, limits: Limits) -> tuple[int, int]:
    """The size an upload of `width`×`height` is drawn at: about the model's default area
    (`limits`, the model's own), the upload's aspect ratio, sides multiples of 8 within the
    limits (of 16 on FLUX: `Limits.size_step`); an extreme ratio is centre-cropped to fit
    rather than stretched."""
    step = limits.size_step
    low, high = -(-limits.min_side // step) * step, limits.max_side // step * step
    scale = math.sqrt(limits.default_width * limits.default_height / (width * height))
    scale = min(scale, high / max(width, height))  # the long side fits
    scale = max(scale, low / min(width, height))  # the short side is not too short

    def side(value: float) -> int:
        return max(low, min(high, round(value * scale / step) * step))

    return side(width), side(height)


def validate(
    raw: RawOptions,
    limits: Limits,
    catalog: Catalog,
    rng: random.Random | None = None,
    *,
    init_image: tuple[str, int, int] | None = None,
    upload_size: tuple[int, int] | None = None,
) -> GenerationRequest:
    """Check every option against the limits and fill defaults; raise InvalidRequest on the first
    problem so the member sees exactly which option to fix. The model (from `catalog`, the
    owner's allowlist) brings its own defaults and limits, negative prompt and LoRAs. With
    `init_image` (hash, width, height) the request is image-to-image: the size is the prepared
    image's, or for a member's upload of `upload_size` the size that upload is drawn at on
    the model (`fitted_size`), and `strength` (default limits.default_strength) must leave at
    least one denoising step."""
    model = catalog.entry(raw.model)
    loras = catalog.check_loras(model.name, raw.loras)
    limits = catalog.limits_for(model.name, limits)
    prompt, negative = _texts(raw, model.negative_prompt)
    count = _integer("count", raw.count, 1, limits.max_count, default=1)
    request = GenerationRequest(  # checked in this order: the member sees the first problem
        prompt=prompt,
        negative_prompt=negative,
        count=count,
        seed=_seed(raw.seed, count, rng),
        steps=_integer("steps", raw.steps, 1, limits.max_steps, default=limits.default_steps),
        guidance=_guidance(raw.guidance, limits),
        width=_side("width", raw.width, limits.default_width, limits),
        height=_side("height", raw.height, limits.default_height, limits),
        scheduler=_scheduler(raw.scheduler, limits, model.name, model.family),
        model=model.name,
        loras=loras,
    )
    if init_image is None:
        if raw.strength is not None:
            raise InvalidRequest("strength", "only applies with an image to vary.")
        return request
    strength = _strength(raw.strength, request.steps, limits)
    image_hash, width, height = init_image
    if upload_size is not None:  # drawn at the size the upload is fitted to on this model
        width, height = fitted_size(*upload_size, limits)
    return replace(
        request,
        mode="image",
        strength=strength,
        width=width,
        height=height,
        init_image_hash=image_hash,
    )


def _texts(raw: RawOptions, model_negative: str) -> tuple[str, str]:
    """The prompt and negative prompt cleaned, the model's negative prompt put first."""
    prompt = _text("prompt", raw.prompt, required=True)
    negative = _text("negative_prompt", raw.negative_prompt, required=False)
    return prompt, _negative(model_negative, negative)


def _seed(value: Any, count: int, rng: random.Random | None) -> int:
    """The first of `count` seeds, drawn when none is given, so the last still fits MAX_SEED."""
    if value is None:
        return (rng or random.SystemRandom()).randint(0, MAX_SEED - count + 1)
    return _integer("seed", value, 0, MAX_SEED - count + 1)


def _guidance(value: Any, limits: Limits) -> float:
    """The guidance scale within the model's limit, to two decimals."""
    if value is None:
        return limits.default_guidance
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest("guidance", f"must be a number from 0 to {limits.max_guidance}.")
    guidance = float(value)
    if not math.isfinite(guidance) or not 0 <= guidance <= limits.max_guidance:
        raise InvalidRequest(
            "guidance", f"must be a number from 0 to {limits.max_guidance}, got {guidance}."
        )
    return round(guidance, 2)


def _scheduler(value: Any, limits: Limits, model: str, family: str | None) -> str:
    """A scheduler by the name members pick, so the pipelines only ever see known names, and
    only those `model`'s family runs with (a flow model's differ from SD's)."""
    scheduler = limits.default_scheduler if value is None else value
    allowed = schedulers_for(family)
    if scheduler in ALL_SCHEDULERS and scheduler not in allowed:
        raise InvalidRequest(
            "scheduler",
            f"{scheduler} does not apply to {model}, a {family_name(family)} model; "
            f"it runs with: {', '.join(allowed)}.",
        )
    if scheduler not in allowed:
        raise InvalidRequest("scheduler", f"must be one of: {', '.join(allowed)}.")
    return scheduler


def _strength(value: Any, steps: int, limits: Limits) -> float:
    """How much of an init image is redrawn, refused when it leaves no step to denoise."""
    strength = limits.default_strength if value is None else value
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise InvalidRequest("strength", "must be a number from 0.05 to 1.")
    strength = round(float(strength), 2)
    if not math.isfinite(strength) or not 0.05 <= strength <= 1:
        raise InvalidRequest("strength", f"must be a number from 0.05 to 1, got {strength}.")
    if denoising_steps(steps, strength) < 1:
        raise InvalidRequest(
            "strength", f"{strength:g} of {steps} steps leaves no step to run; raise either."
        )
    return strength


class JobStatus(StrEnum):
    """Where a job is: queued → running → done | failed | cancelled (the jobs table's CHECK)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Job:
    """An admitted request as the store holds it: who asked, where to answer, and its state."""

    id: int
    member_id: int
    guild_id: int | None
    channel_id: int | None
    request: GenerationRequest
    status: JobStatus = JobStatus.QUEUED
    queued_at: float = 0.0
    attempts: int = 0
    batch_id: int | None = None
    parent_job_id: int | None = None
    parent_image_index: int | None = None
    weight: float = 1.0  # the member's fair-share weight when it was admitted

    @property
    def image_specs(self) -> list[ImageSpec]:
        r = self.request
        return [
            ImageSpec(r.prompt, r.negative_prompt, seed, r.guidance, keep_box=r.keep_box)
            for seed in r.seeds
        ]
