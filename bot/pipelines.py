"""Loading Stable Diffusion pipelines and running one diffusers call per batch.

Everything torch touches lives here, so the rest of the bot can stay importable and testable
without a GPU. The tiny random-weight model goes through the same loading code as real ones.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import huggingface_hub.constants
import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    SchedulerMixin,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

# The top-level name is a placeholder that raises when scipy is missing; the real class is here.
from diffusers.schedulers.scheduling_lms_discrete import LMSDiscreteScheduler
from huggingface_hub.errors import EntryNotFoundError, HFValidationError
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from bot.requests import SCHEDULERS, BatchKey, ImageSpec

log = logging.getLogger(__name__)

TINY_MODEL = "tiny"
# What a member reads when the VAE gave NaN even in float32 (an fp16 overflow that stuck).
BLANK_IMAGE_ERROR = "the image came out blank (NaN); try another seed or fewer steps"
MODES = ("text", "image")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class ModelNotAvailable(RuntimeError):
    """The weights are not on this machine and cannot be fetched now; the message says how."""


def resolve_device(setting: str, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """Turn the `device`/`dtype` settings into torch values; fail at start-up, not mid-batch."""
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}.")
    if setting == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    elif setting == "cpu":
        device = torch.device("cpu")
    elif setting == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("device 'mps' was asked for but this machine has no MPS backend.")
        device = torch.device("mps")
    elif setting == "cuda" or setting.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {setting!r} was asked for but CUDA is not available here "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                "use 'cpu' or 'auto'."
            )
        try:
            device = torch.device(setting)
        except RuntimeError as exc:
            raise ValueError(f"device {setting!r} is not a valid CUDA device name.") from exc
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {setting!r} was asked for but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible."
            )
    else:
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {setting!r}.")
    if dtype is not None:
        return device, _DTYPES[dtype]
    return device, torch.float32 if device.type == "cpu" else torch.float16


@dataclass
class PipelineOptions:
    """How pipelines are loaded; one value per bot process, taken from the settings."""

    device: str = "auto"
    dtype: str | None = None
    cache_dir: Path = Path("data/models")
    attention_slicing: bool = False
    safety_checker: bool = True
    # Images per VAE decode: a larger batch is decoded in slices of this size, which keeps
    # the decoder's large activations out of the batch's peak memory.
    vae_decode_batch: int = 1
    channels_last: bool = False
    compile_unet: bool = False
    compile_backend: str = "inductor"
    # The largest call the executor makes: compiled calls are padded to a bucket no larger.
    max_batch_size: int = 8
    # The GPU memory probe runs at the largest square size members may ask for.
    largest_side: int = 1024


# Share of the free GPU memory that batches may plan to use; the rest absorbs fragmentation.
MEMORY_HEADROOM = 0.85


@dataclass(frozen=True)
class MemoryFit:
    """What the start-up probe measured: device bytes a call needs whatever its size
    (`fixed_bytes`) and per image (`per_image_bytes`), both at `probe_pixels`, and the bytes
    free for calls once the model is loaded."""

    fixed_bytes: int
    per_image_bytes: int
    probe_pixels: int
    free_bytes: int

    def images_that_fit(self, pixels: int) -> int:
        """The largest batch of `pixels`-sized images expected to fit. The per-image cost is
        scaled linearly from the probe, taken at the largest size, which overestimates it for
        smaller images whatever the attention kernel does; the fixed part is not scaled."""
        per_image = self.per_image_bytes * pixels / self.probe_pixels
        room = self.free_bytes * MEMORY_HEADROOM - self.fixed_bytes
        return max(1, int(room // per_image))


class MemoryMeter(Protocol):
    """A device allocator's counters, as the start-up memory probe reads them."""

    def start(self) -> int:
        """Clear cached blocks and the peak counter; return the bytes allocated now."""

    def peak(self) -> int:
        """The most bytes allocated since `start`."""

    def free(self) -> int:
        """Bytes the device has free, with nothing cached."""


class CudaMemory:
    """The CUDA caching allocator's counters for one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def free(self) -> int:
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(self.device)[0]


def padded_batch_size(images: int, cap: int) -> int:
    """The batch a compiled call runs at: the next power of two, but never past the cap, so a
    compiled UNet meets a few batch shapes instead of one per batch size and compiles once
    for each."""
    bucket = 1
    while bucket < images:
        bucket *= 2
    return max(images, min(bucket, cap))


# SD 1.5's scheduler_config.json verbatim; PNDM keeps `clip_sample` as a hidden entry that
# DDIM picks up, as it does with the real model.
SD15_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "clip_sample": False,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-printable-character table, which CLIP's byte-level BPE also uses."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def tiny_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every byte is a token, so any text encodes offline."""
    symbols = list(_bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def _tiny_pipeline(with_safety_checker: bool) -> StableDiffusionPipeline:
    """SD 1.x's architecture at toy size: same classes and latent geometry, random weights."""
    tokenizer = tiny_tokenizer()
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    small = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4}
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    # Four blocks give SD's VAE scale factor of 8: 64×64 pixels ↔ 8×8 latents.
    vae = AutoencoderKL(
        sample_size=64,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(**small, **ids, num_hidden_layers=2, max_position_embeddings=77)
    )
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    safety_checker = feature_extractor = None
    if with_safety_checker:
        safety_checker = StableDiffusionSafetyChecker(
            CLIPConfig(
                text_config={**small, **ids, "num_hidden_layers": 1},
                vision_config={**small, "num_hidden_layers": 1, "image_size": 32, "patch_size": 8},
                projection_dim=32,
            )
        )
        feature_extractor = CLIPImageProcessor(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        requires_safety_checker=with_safety_checker,
    )


def build_tiny_model(folder: Path, *, with_safety_checker: bool = False) -> Path:
    """Save a tiny random SD 1.x model into `folder` (reused if already complete), so tests and
    offline smoke runs exercise the real loading code without downloading weights."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if index.is_file():
        has_checker = json.loads(index.read_text()).get("safety_checker", [None])[0] is not None
        if has_checker != with_safety_checker:
            raise FileExistsError(
                f"{folder} holds a tiny model {'with' if has_checker else 'without'} a safety "
                "checker; delete it or use another folder."
            )
        return folder
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty but holds no model_index.json.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so an interrupted build never looks complete.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            pipe = _tiny_pipeline(with_safety_checker)
        pipe.save_pretrained(staging)
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _looks_like_path(model_id: str) -> bool:
    """Hub ids are `owner/name`; anything else with a separator or dot prefix is a folder."""
    return (
        Path(model_id).expanduser().exists()
        or model_id.startswith((".", "~", "/", "\\"))
        or model_id.count("/") > 1
        or "\\" in model_id
    )


def _not_available(model_id: str, options: PipelineOptions, reason: str) -> ModelNotAvailable:
    """The error an operator sees at start-up: what is missing and the command that fetches it."""
    cache = options.cache_dir
    if _looks_like_path(model_id):
        hint = (
            "Point the model setting at a folder written by `save_pretrained` (it holds "
            "model_index.json), or at a Hub id such as stable-diffusion-v1-5/stable-diffusion-v1-5."
        )
    else:
        offline = (
            " HF_HUB_OFFLINE is set, so nothing is downloaded at start-up."
            if huggingface_hub.constants.HF_HUB_OFFLINE
            else ""
        )
        hint = (
            f"Fetch it once with `python -m bot download {model_id}` or "
            f"`huggingface-cli download {model_id} --cache-dir {cache}`, then start the bot "
            f"again.{offline}"
        )
    return ModelNotAvailable(f"Model {model_id!r} is not available: {reason}. {hint}")


def load_pipeline(model_id: str, options: PipelineOptions) -> StableDiffusionPipeline:
    """Load a text-to-image pipeline from a Hub id or a local folder, ready to call on the device;
    `tiny` is built locally first and then loaded exactly like a real model."""
    device, dtype = resolve_device(options.device, options.dtype)
    source = model_id
    if model_id == TINY_MODEL:
        source = str(build_tiny_model(Path(options.cache_dir) / "tiny-sd"))
    elif _looks_like_path(model_id):
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            raise _not_available(model_id, options, "no such folder")
        if not (folder / "model_index.json").is_file():
            raise _not_available(model_id, options, "the folder holds no model_index.json")
        source = str(folder)
    extra: dict[str, Any] = {}
    if not options.safety_checker:
        extra = {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, cache_dir=str(options.cache_dir), **extra
        )
    except (OSError, HFValidationError, EntryNotFoundError) as exc:
        # huggingface_hub's "not cached", "offline", "not found" and connection errors are all
        # OSError subclasses; the first line of the original names the real cause.
        reason = str(exc).splitlines()[0].rstrip(". ") if str(exc) else type(exc).__name__
        raise _not_available(model_id, options, reason) from exc
    if options.attention_slicing:
        pipe.enable_attention_slicing()
    if options.vae_decode_batch == 1:
        pipe.vae.enable_slicing()  # img2img's encoder then also takes one image at a time
    pipe.to(device)
    if options.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if options.compile_unet:
        # One graph per (batch bucket, size): every size members use costs one compilation,
        # so allow more than torch's default of 8 before it falls back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        pipe.unet.compile(backend=options.compile_backend, dynamic=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


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


def _with_scheduler(
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


@dataclass
class GeneratedImage:
    """One output image; `withheld` images were flagged by the safety checker and must not be
    delivered (their pixels are blacked out anyway). `error` says why an image is unusable."""

    image: PIL.Image.Image
    withheld: bool
    error: str | None = None


def _not_finite(images: torch.Tensor) -> torch.Tensor:
    """One flag per image: any NaN or Inf pixel (what an fp16 VAE overflow leaves)."""
    return ~torch.isfinite(images).flatten(1).all(dim=1)


def decode_latents(
    vae: AutoencoderKL, latents: torch.Tensor, slice_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode latents to [-1, 1] images, `slice_size` at a time, with a bad-output flag per
    image; NaN/Inf images are decoded once more with the VAE in float32, the usual cure for
    fp16 overflow."""
    scale = vae.config.scaling_factor

    def decode(chosen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        parts = (chosen.to(dtype) / scale).split(slice_size)
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


class Interrupted(RuntimeError):
    """A call stopped early on request; its images are not to be used."""


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
    """One small RGB picture per image in the batch, straight from the latents."""
    rgb = torch.einsum("bchw,cr->bhwr", latents.detach().float().cpu(), _LATENT_RGB)
    rgb = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return [
        PIL.Image.fromarray(array).resize((array.shape[1] * 4, array.shape[0] * 4)) for array in rgb
    ]


class PipelineRunner:
    """Owns the loaded pipelines, one per model id, loaded lazily and kept for the process.

    Not thread-safe and needs no lock: a single worker thread per device calls `load` and
    `generate`. `token_count` uses its own tokenizer copy, so another thread may call it for a
    model that is already loaded.
    """

    def __init__(self, options: PipelineOptions) -> None:
        self.options = options
        self.device, self.dtype = resolve_device(options.device, options.dtype)
        self._pipelines: dict[str, StableDiffusionPipeline] = {}
        self._tokenizers: dict[str, Any] = {}
        self._memory_fits: dict[str, MemoryFit] = {}
        self._interrupted = threading.Event()

    def interrupt(self) -> None:
        """Stop the running call at its next step (shutdown, or every job cancelled), and any
        call started before `resume()`: they raise Interrupted. Safe from any thread."""
        self._interrupted.set()

    def resume(self) -> None:
        """Let calls run again after `interrupt()`; the executor calls this per batch."""
        self._interrupted.clear()

    def load(self, model: str) -> StableDiffusionPipeline:
        """Load `model` now (at start-up) so missing weights fail early and nobody waits."""
        pipe = self._pipelines.get(model)
        if pipe is None:
            pipe = load_pipeline(model, self.options)
            # The pipeline reconfigures its tokenizer on every call; counting uses a copy.
            self._tokenizers[model] = copy.deepcopy(pipe.tokenizer)
            self._pipelines[model] = pipe
            if self.device.type == "cuda":
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
        key = BatchKey(model, "text", side, side, steps=1, scheduler="Euler", guidance=7.5)
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

    def token_count(self, model: str, prompt: str) -> int:
        """CLIP tokens `prompt` takes without start/end tokens; past MAX_PROMPT_TOKENS is cut."""
        if model not in self._tokenizers:
            self.load(model)
        tokenizer = self._tokenizers[model]
        return len(tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"])

    def generate(
        self,
        key: BatchKey,
        specs: list[ImageSpec],
        *,
        progress: Callable[[int, int, list[PIL.Image.Image] | None], None] | None = None,
        preview_every: int = 0,
    ) -> list[GeneratedImage]:
        """Run ONE diffusers call for the batch with a generator per image, so each image depends
        only on its own spec and the key. `progress(done, total, previews)` is called after each
        step, with a rough preview per image every `preview_every` steps (else None).
        Mode "image" starts from each spec's `init_image` and denoises int(steps × strength)
        steps. Latents are decoded here, so a NaN image can be retried in float32. A compiled
        UNet runs the call padded to its batch bucket (`padded_batch_size`)."""
        if key.mode not in MODES:
            raise ValueError(f"unknown mode {key.mode!r}; expected one of: {', '.join(MODES)}.")
        if not specs:
            return []
        base = self.load(key.model)
        wanted = len(specs)
        if self.options.compile_unet:
            # Copies of the last image fill the bucket; their results are dropped below.
            largest = self.options.max_batch_size
            cap = min(largest, self.batch_limit(key) or largest)
            padding = padded_batch_size(wanted, cap) - wanted
            specs = specs + [specs[-1]] * padding
        extra: dict[str, Any] = {}
        if key.mode == "image":
            extra = self._image_arguments(key, specs)
            pipe = _with_scheduler(base, key.scheduler, StableDiffusionImg2ImgPipeline)
        else:
            extra = {"width": key.width, "height": key.height}
            pipe = _with_scheduler(base, key.scheduler)
        # MPS generators are not reliable across torch versions; diffusers accepts CPU ones.
        gen_device = torch.device("cpu") if self.device.type == "mps" else self.device

        def on_step(call: Any, step: int, _t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if self._interrupted.is_set():
                call._interrupt = True  # diffusers skips the remaining steps
            elif progress is not None:
                done = step + 1
                due = preview_every and done % preview_every == 0 and done < call.num_timesteps
                previews = latent_previews(kwargs["latents"][:wanted]) if due else None
                progress(done, call.num_timesteps, previews)
            return kwargs

        extra["callback_on_step_end"] = on_step
        latents = pipe(
            prompt=[spec.prompt for spec in specs],
            negative_prompt=[spec.negative_prompt for spec in specs],
            generator=[torch.Generator(gen_device).manual_seed(spec.seed) for spec in specs],
            num_inference_steps=key.steps,
            guidance_scale=key.guidance,
            output_type="latent",
            **extra,
        ).images[:wanted]
        if self._interrupted.is_set():
            raise Interrupted("the call was interrupted")
        images, bad = decode_latents(pipe.vae, latents, self.options.vae_decode_batch)
        images, flags = pipe.run_safety_checker(images, self.device, pipe.text_encoder.dtype)
        flags = flags or [False] * wanted
        pictures = pipe.image_processor.postprocess(
            images, output_type="pil", do_denormalize=[not flag for flag in flags]
        )
        return [
            GeneratedImage(
                image=picture, withheld=bool(flag), error=BLANK_IMAGE_ERROR if blank else None
            )
            for picture, flag, blank in zip(pictures, flags, bad.tolist(), strict=True)
        ]

    @staticmethod
    def _image_arguments(key: BatchKey, specs: list[ImageSpec]) -> dict[str, Any]:
        """The img2img call's own arguments, checked here so a bad batch fails with a reason
        instead of deep inside diffusers."""
        if key.strength is None or not 0 < key.strength <= 1:
            raise ValueError(f"mode 'image' needs a strength in (0, 1], got {key.strength!r}.")
        if int(key.steps * key.strength) < 1:
            raise ValueError(
                f"{key.steps} steps at strength {key.strength:g} leave no step to run; "
                "raise the steps or the strength."
            )
        size = (key.width, key.height)
        for spec in specs:
            image = spec.init_image
            if not isinstance(image, PIL.Image.Image) or image.size != size:
                got = getattr(image, "size", None)
                raise ValueError(f"mode 'image' needs an init image of {size}, got {got}.")
        return {
            "image": [spec.init_image.convert("RGB") for spec in specs],
            "strength": key.strength,
        }
