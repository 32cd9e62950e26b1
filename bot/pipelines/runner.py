"""The runner: one diffusers call per batch on one device, with its resident models
(bot/pipelines/residency.py: loaded lazily, kept within a memory budget, a call's LoRAs set
once per call).

Latents are decoded here, not inside diffusers, so a NaN image can be retried in float32 and
previews can be drawn from the latents while a call runs.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from bot.pipelines.devices import (
    CudaMemory,
    MemoryFit,
    MemoryMeter,
    padded_batch_size,
    resolve_device,
)
from bot.pipelines.flow import FLOW_SCHEDULER, is_flow
from bot.pipelines.loading import PipelineOptions
from bot.pipelines.per_image import (
    guided_class,
    init_images,
    inpaint_arguments,
    pasted_back,
    strength_for,
    use_vae_tiles,
)
from bot.pipelines.prompt_encoding import PromptEncoder, call_groups, tokenize_chunks
from bot.pipelines.residency import ResidentModels
from bot.pipelines.schedulers import with_scheduler
from bot.requests import BatchKey, ImageSpec
from bot.results import BLANK_IMAGE_ERROR, GeneratedImage, Interrupted, RunnerProgress

if TYPE_CHECKING:
    from bot.models import Catalog

log = logging.getLogger(__name__)

MODES = ("text", "image", "inpaint")

# What the runner does after each denoising step, given the pipeline running the call, the
# step's index and the latents of the images asked for (compile padding left out).
OnStep = Callable[[Any, int, torch.Tensor], None]


def check_mode(key: BatchKey) -> None:
    """Refuse an unknown mode before anything is loaded."""
    if key.mode not in MODES:
        raise ValueError(f"unknown mode {key.mode!r}; expected one of: {', '.join(MODES)}.")


def mode_arguments(key: BatchKey, specs: list[ImageSpec]) -> dict[str, Any]:
    """The call's arguments for its mode, checked here so a bad batch fails with a reason
    instead of deep inside diffusers."""
    if key.mode == "inpaint":
        return inpaint_arguments(key, specs)
    if key.mode == "text":
        return {"width": key.width, "height": key.height}
    if key.image_steps is None:
        raise ValueError("mode 'image' needs the steps to denoise from the init image.")
    # Any strength with the key's step count runs the same computation; this is one.
    strength = strength_for(key.steps, key.image_steps)
    return {"image": init_images(key, specs), "strength": strength}


def _not_finite(images: torch.Tensor) -> torch.Tensor:
    """One flag per image: any NaN or Inf pixel (what an fp16 VAE overflow leaves)."""
    return ~torch.isfinite(images).flatten(1).all(dim=1)


def decode_latents(
    vae: AutoencoderKL, latents: torch.Tensor, slice_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode latents to [-1, 1] images, `slice_size` at a time, with a bad-output flag per
    image; NaN/Inf images are decoded once more with the VAE in float32, the usual cure for
    fp16 overflow. A VAE with a shift (FLUX's) gets it added back after the scale."""
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    def decode(chosen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        parts = (chosen.to(dtype) / scale + shift).split(slice_size)
        return torch.cat([vae.decode(part, return_dict=False)[0] for part in parts])

    with torch.no_grad():
        images = decode(latents, vae.dtype)
        bad = _not_finite(images)
        if bad.any():
            dtype = vae.dtype
            vae.to(torch.float32)
            try:
                images[bad] = decode(latents[bad], torch.float32).to(images.dtype)
            finally:
                vae.to(dtype)
            bad = _not_finite(images)
    # Blank images decode to black, not to whatever NaN casts to.
    images[bad] = -1.0
    return images, bad


def safety_check(
    pipe: Any, images: torch.Tensor, device: torch.device, keep_flagged: bool = False
) -> tuple[torch.Tensor, list[bool]]:
    """The images with those the safety checker flags blacked out (kept with `keep_flagged`,
    for delivery to show as spoilers in age-restricted channels), and the flags: SD 1.x/2.x
    ship a checker (unless the model turns it off), SDXL none."""
    flags = None
    if hasattr(pipe, "run_safety_checker"):
        seen = images.clone() if keep_flagged else images  # the checker blacks out in place
        checked, flags = pipe.run_safety_checker(seen, device, pipe.text_encoder.dtype)
        images = images if keep_flagged else checked
    return images, [bool(flag) for flag in flags] if flags else [False] * len(images)


# A fixed linear map from SD 1.x's four latent channels to RGB: a blurry but recognisable
# preview at no cost, since the VAE is not run.
_LATENT_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)


def latent_previews(latents: torch.Tensor) -> list[PIL.Image.Image]:
    """One small RGB picture per image in the batch, straight from the latents; latents of
    other than four channels (FLUX's 16) as the mean of every third channel, rougher still."""
    channels = latents.shape[1]
    mapping = _LATENT_RGB
    if channels != 4:
        mapping = torch.zeros(channels, 3)
        mapping[torch.arange(channels), torch.arange(channels) % 3] = 3 / channels
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float().cpu(), mapping)
    rgb = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return [
        PIL.Image.fromarray(array).resize((array.shape[1] * 4, array.shape[0] * 4)) for array in rgb
    ]


class PipelineRunner:
    """Runs the calls of one device on its resident models (`models`, by allowlist name).

    A single worker thread per device calls `load` and `generate`. `prompt_chunks` (which
    loads only a tokenizer) and `resident_models` may be called from any thread.
    """

    def __init__(self, options: PipelineOptions, catalog: Catalog | None = None) -> None:
        self.options = options
        self.device, self.dtype = resolve_device(options.device, options.dtype)
        self.models = ResidentModels(options, catalog, self.device, self.release_memory)
        self._memory_fits: dict[str, MemoryFit] = {}
        self._interrupted = threading.Event()

    def interrupt(self) -> None:
        """Stop the running call at its next step (shutdown, or every job cancelled), and any
        call started before `resume()`: they raise Interrupted. Safe from any thread."""
        self._interrupted.set()

    def resume(self) -> None:
        """Let calls run again after `interrupt()`; the executor calls this per batch."""
        self._interrupted.clear()

    def resident_models(self) -> frozenset[str]:
        """The models loaded now (a snapshot; safe from any thread)."""
        return self.models.resident_models()

    def memory_fits(self) -> dict[str, MemoryFit]:
        """What the memory probe found for each model measured here (a snapshot; safe from any
        thread): a Ray worker sends it to the bot, whose batches must fit this device."""
        return dict(self._memory_fits)

    def load(self, model: str) -> DiffusionPipeline:
        """The loaded pipeline of `model`, loading it if it is not resident (the least
        recently used models unloaded first if it would not fit beside them). Calling it at
        start-up makes missing weights fail early and spares the first member the wait."""
        pipe = self.models.load(model).pipe
        if self.device.type == "cuda" and model not in self._memory_fits:
            self.measure_memory(model, CudaMemory(self.device))
        return pipe

    def batch_limit(self, key: BatchKey) -> int | None:
        """How many images of this key fit in GPU memory at once, from the start-up probe;
        None where nothing was measured (CPU, MPS), and the configured cap alone applies."""
        fit = self._memory_fits.get(key.model)
        return None if fit is None else fit.images_that_fit(key.width * key.height)

    def measure_memory(self, model: str, meter: MemoryMeter) -> MemoryFit | None:
        """Run one-step calls of one and two images at the largest size and read the peak
        device memory of each: their difference is what an image costs, the rest is what a
        call costs. Also warms the kernels up, so the first member does not pay for it.
        `batch_limit` answers from what this finds."""
        side = self.options.largest_side
        scheduler = FLOW_SCHEDULER if is_flow(self.models.load(model).pipe) else "Euler"
        key = BatchKey(model, "text", side, side, steps=1, scheduler=scheduler, cfg=True)
        peaks: list[int] = []
        for images in (1, 2):
            before = meter.start()
            try:
                self.generate(key, [ImageSpec("probe", "", seed) for seed in range(images)])
            except torch.cuda.OutOfMemoryError:
                break
            peaks.append(meter.peak() - before)
        free = meter.free()
        if not peaks:
            log.warning(
                "one %d×%d image does not fit in the %.1f GiB of GPU memory left after loading "
                "%s; lower MAX_SIZE",
                side,
                side,
                free / 2**30,
                model,
            )
            return None
        per_image = peaks[1] - peaks[0] if len(peaks) == 2 else peaks[0]
        fit = MemoryFit(
            fixed_bytes=max(0, peaks[0] - per_image),
            per_image_bytes=max(1, per_image),
            probe_pixels=side * side,
            free_bytes=free,
        )
        self._memory_fits[model] = fit
        log.info(
            "GPU memory for %s: %.1f GiB free; a call takes %.2f GiB plus %.2f GiB per %d×%d "
            "image, so at most %d image(s) at %d×%d and %d at 512×512",
            model,
            free / 2**30,
            fit.fixed_bytes / 2**30,
            fit.per_image_bytes / 2**30,
            side,
            side,
            fit.images_that_fit(side * side),
            side,
            side,
            fit.images_that_fit(512 * 512),
        )
        return fit

    def release_memory(self) -> None:
        """Hand cached blocks back to the device after an out-of-memory error, so the
        smaller retry starts from a clean allocator."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        elif self.device.type == "mps":
            torch.mps.empty_cache()

    def prompt_chunks(self, model: str, prompt: str) -> int:
        """The 75-token chunks `prompt` is encoded in (at least one; `BREAK` starts another),
        from the model's tokenizer alone (a flow model's T5 tokens, counted in chunks of 75
        too). Raises InvalidRequest on a weight syntax error."""
        return len(tokenize_chunks(self.models.tokenizer(model), prompt))

    def generate(
        self,
        key: BatchKey,
        specs: list[ImageSpec],
        *,
        progress: RunnerProgress | None = None,
        preview_every: int = 0,
    ) -> list[GeneratedImage]:
        """Run ONE diffusers call for the batch with a generator and a guidance scale per image,
        so each image depends only on its own spec and the key. `progress(done, total, previews)`
        is called after each step, with a rough preview per image every `preview_every` steps
        (else None).
        Mode "image" starts from each spec's `init_image` and denoises `key.denoising_steps`
        steps. Latents are decoded here, so a NaN image can be retried in float32. A compiled
        UNet runs the call padded to its batch bucket (`padded_batch_size`)."""
        check_mode(key)
        if not specs:
            return []
        encoder = self._with_loras(key)
        chunks = encoder.chunk_count
        groups = call_groups([math.lcm(chunks(s.prompt), chunks(s.negative_prompt)) for s in specs])
        if len(groups) > 1:  # chunk counts whose common length would be too long for one call
            return self._generate_groups(key, specs, groups, progress)
        pipe = self._call_pipeline(key)
        latents = self._denoise(pipe, encoder, key, specs, self._on_step(progress, preview_every))
        if self._interrupted.is_set():
            raise Interrupted("the call was interrupted")
        images, blank = decode_latents(pipe.vae, latents, self.options.vae_decode_batch)
        keep = self.options.keep_flagged
        images, withheld = safety_check(pipe, images, self.device, keep)
        blacked = [flag and not keep for flag in withheld]
        pictures = pipe.image_processor.postprocess(
            images, output_type="pil", do_denormalize=[not flag for flag in blacked]
        )
        if key.mode == "inpaint":
            pictures = pasted_back(pictures, specs, blacked, blank.tolist())
        return [
            GeneratedImage(image=picture, withheld=flag, error=BLANK_IMAGE_ERROR if empty else None)
            for picture, flag, empty in zip(pictures, withheld, blank.tolist(), strict=True)
        ]

    def _with_loras(self, key: BatchKey) -> PromptEncoder:
        """The key's model loaded with the call's LoRA set active; its prompt encoder, which
        the LoRAs change too."""
        self.load(key.model)
        self.models.use_loras(key.model, key.loras)
        return self.models.load(key.model).encoder

    def _call_pipeline(self, key: BatchKey) -> Any:
        """The loaded model as this mode's per-image-guidance pipeline, with the key's scheduler
        (a fresh one per call, the weights shared) and the VAE tiled for large images."""
        base = self.models.load(key.model).pipe
        pipe = with_scheduler(base, key.scheduler, guided_class(base, key.mode))
        use_vae_tiles(pipe.vae, key.width * key.height > self.options.vae_tiling_pixels)
        return pipe

    def _denoise(
        self,
        pipe: Any,
        encoder: PromptEncoder,
        key: BatchKey,
        specs: list[ImageSpec],
        on_step: OnStep,
    ) -> torch.Tensor:
        """The call's latents, one per spec. The compile padding lives here alone: a compiled
        UNet runs the call padded to its batch bucket with copies of the last spec, and
        neither the steps' latents nor the result show the copies."""
        wanted = len(specs)
        specs = specs + [specs[-1]] * self._padding(key, wanted)

        def callback(
            call: Any, step: int, _timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            on_step(call, step, tensors["latents"][:wanted])
            return tensors

        # MPS generators are not reliable across torch versions; diffusers accepts CPU ones.
        gen_device = torch.device("cpu") if self.device.type == "mps" else self.device
        return pipe.guided_call(
            [spec.guidance for spec in specs],
            key.cfg,
            **encoder.arguments(
                [spec.prompt for spec in specs], [spec.negative_prompt for spec in specs]
            ),
            **mode_arguments(key, specs),
            generator=[torch.Generator(gen_device).manual_seed(spec.seed) for spec in specs],
            num_inference_steps=key.steps,
            output_type="latent",
            callback_on_step_end=callback,
        ).images[:wanted]

    def _padding(self, key: BatchKey, wanted: int) -> int:
        """How many copies fill a compiled UNet's batch bucket (none uncompiled): a few
        buckets are compiled once, instead of every batch size."""
        if not self.options.compile_unet:
            return 0
        largest = self.options.max_batch_size
        cap = min(largest, self.batch_limit(key) or largest)
        return padded_batch_size(wanted, cap) - wanted

    def _on_step(self, progress: RunnerProgress | None, preview_every: int) -> OnStep:
        """After each denoising step: an interrupted call is stopped (diffusers skips its
        remaining steps), a running one reports the step, with previews when due."""

        def on_step(call: Any, step: int, latents: torch.Tensor) -> None:
            if self._interrupted.is_set():
                call._interrupt = True  # diffusers reads it through its `interrupt` property
            elif progress is not None:
                done = step + 1
                due = preview_every and done % preview_every == 0 and done < call.num_timesteps
                progress(done, call.num_timesteps, latent_previews(latents) if due else None)

        return on_step

    def _generate_groups(
        self,
        key: BatchKey,
        specs: list[ImageSpec],
        groups: list[list[int]],
        progress: RunnerProgress | None,
    ) -> list[GeneratedImage]:
        """One call per group of `call_groups`, results in the order of `specs`. Previews are
        left out: they are reported per call, and each call holds only part of the batch."""

        def steps_only(done: int, total: int, _previews: Any = None) -> None:
            if progress is not None:
                progress(done, total, None)

        results: dict[int, GeneratedImage] = {}
        for group in groups:
            images = self.generate(key, [specs[i] for i in group], progress=steps_only)
            results.update(zip(group, images, strict=True))
        return [results[index] for index in range(len(specs))]
