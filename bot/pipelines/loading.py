"""Loading a pipeline (SD 1.x/2.x, SDXL, their Turbo and LCM variants; FLUX.1) from a Hub id,
a local folder or a built-in source, ready on its device; finding a LoRA's file.

Loading never downloads (bot/downloads.py does, on start or with `python -m bot download`):
a Hub model is loaded from its complete cached snapshot (of the commit its allowlist entry
pins, if any), and a model that is not on this machine fails with the command that fetches
it. The pipeline class comes from the model's own model_index.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
import transformers
from diffusers import (
    DiffusionPipeline,
    FluxPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from huggingface_hub.errors import EntryNotFoundError, HFValidationError

from bot.downloads import (
    MODEL_INDEX,
    WEIGHT_SUFFIXES,
    ModelNotAvailable,
    cached_lora,
    cached_model,
    looks_like_path,
    needed_files,
)
from bot.pipelines.devices import resolve_device
from bot.pipelines.tiny import BUILT_IN_LORAS, BUILT_IN_MODELS, LORA_WEIGHT_NAME, built_in
from bot.pipelines.tiny_flow import TINY_FLUX, build_tiny_flux

BUILT_IN_MODELS[TINY_FLUX] = ("tiny-flux", build_tiny_flux)

__all__ = [
    "PIPELINE_FAMILIES",
    "ModelNotAvailable",
    "PipelineOptions",
    "load_pipeline",
    "load_tokenizer",
    "lora_file",
]

# The class a model loads as, by the `_class_name` of its model_index.json. The runner builds
# every mode (text, image, inpaint) from the loaded pipeline's modules, so a family appears
# once: Turbo models are SD or SDXL loaded the same way (their guidance 0 and 1–4 steps come
# from the allowlist entry), and an LCM model is SD 1.x with a guidance embedding in its UNet
# (the "LCM" scheduler runs it). FLUX.1 [dev] and [schnell] load alike; the transformer's
# config says whether it embeds guidance. bot/families.py names the same classes' families.
PIPELINE_FAMILIES: dict[str, type[DiffusionPipeline]] = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionImg2ImgPipeline": StableDiffusionPipeline,
    "StableDiffusionInpaintPipeline": StableDiffusionPipeline,
    "LatentConsistencyModelPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
    "StableDiffusionXLInpaintPipeline": StableDiffusionXLPipeline,
    "FluxPipeline": FluxPipeline,
    "FluxImg2ImgPipeline": FluxPipeline,
    "FluxInpaintPipeline": FluxPipeline,
}


# A family whose prompt is bounded by another tokenizer than its first: FLUX.1's CLIP reads
# 77 tokens for the pooled embedding only; its T5 reads the prompt.
PROMPT_TOKENIZERS: dict[type[DiffusionPipeline], str] = {FluxPipeline: "tokenizer_2"}


def prompt_tokenizer(pipe: DiffusionPipeline) -> Any:
    """A loaded pipeline's tokenizer that bounds the prompt's length."""
    return getattr(pipe, PROMPT_TOKENIZERS.get(type(pipe), "tokenizer"))


@dataclass
class PipelineOptions:
    """How pipelines are loaded; one value per bot process, taken from the settings."""

    device: str = "auto"
    dtype: str | None = None
    cache_dir: Path = Path("data/models")
    attention_slicing: bool = False
    safety_checker: bool = True
    # Flagged images keep their pixels (NSFW_CHANNELS=allow): delivery shows them as spoilers
    # in age-restricted channels and withholds them elsewhere. Else they are blacked out here.
    keep_flagged: bool = False
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
    # Bytes the resident models' weights may take together; None: from the device
    # (`devices.memory_budget`). The least recently used model is unloaded to make room.
    memory_budget_bytes: int | None = None
    # Results above this many pixels are encoded and decoded by the VAE in tiles.
    vae_tiling_pixels: int = 1024 * 1024
    # The Hub commit a source is read at: its allowlist entry's `revision`, set per model and
    # LoRA like `safety_checker` (bot/pipelines/residency.py); None: where `main` was fetched.
    revision: str | None = None


def _not_available(model_id: str, options: PipelineOptions, reason: str) -> ModelNotAvailable:
    """The error an operator sees at start-up: what is missing and the command that fetches it."""
    cache = options.cache_dir
    if looks_like_path(model_id):
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
        pinned = options.revision
        hint = (
            f"Fetch it once with `python -m bot download {model_id}` or "
            f"`huggingface-cli download {model_id} --cache-dir {cache}`, then start the bot "
            f"again.{offline}"
            if pinned is None
            else f"models.toml pins {pinned}: fetch it with `python -m bot download`.{offline}"
        )
    return ModelNotAvailable(f"Model {model_id!r} is not available: {reason}. {hint}")


def _model_folder(model_id: str, options: PipelineOptions) -> str:
    """Where `model_id` loads from: a built-in's built folder, a local folder, a Hub id's cached
    snapshot, or the Hub id itself when nothing is cached (loading then fails and says so)."""
    built = built_in(model_id, options.cache_dir)
    if built is not None:
        return str(built)
    if looks_like_path(model_id):
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            raise _not_available(model_id, options, "no such folder")
        if not (folder / MODEL_INDEX).is_file():
            raise _not_available(model_id, options, "the folder holds no model_index.json")
        return str(folder)
    snapshot = cached_model(model_id, options.cache_dir, options.revision)
    return model_id if snapshot is None else str(snapshot)


def _model_index(source: str) -> dict[str, Any]:
    index = Path(source) / MODEL_INDEX
    return json.loads(index.read_text()) if index.is_file() else {}


def pipeline_family(model_id: str, source: str) -> type[DiffusionPipeline]:
    """The pipeline class `source` loads as, from its model_index.json; a source with none
    (a Hub id not cached) loads as SD, which then fails with the reason."""
    name = _model_index(source).get("_class_name", "StableDiffusionPipeline")
    family = PIPELINE_FAMILIES.get(name)
    if family is None:
        raise ModelNotAvailable(
            f"Model {model_id!r} is a {name}, which the bot does not run; it runs "
            f"{', '.join(PIPELINE_FAMILIES)}."
        )
    return family


def weights_bytes(model_id: str, options: PipelineOptions) -> int:
    """What `model_id`'s weights will take once loaded in the configured dtype, read from its
    safetensors headers (other formats by file size) before loading; 0 if not on disk."""
    source = Path(_model_folder(model_id, options))
    index = _model_index(str(source))
    if not index:
        return 0
    _, dtype = resolve_device(options.device, options.dtype)
    paths = [str(p.relative_to(source)) for p in source.glob("*/*") if p.is_file()]
    total = 0
    for name in needed_files(paths, index):
        path = source / name
        if path.suffix == ".safetensors":
            with path.open("rb") as file:
                header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
            shapes = [v["shape"] for k, v in header.items() if k != "__metadata__"]
            total += sum(math.prod(shape) for shape in shapes) * dtype.itemsize
        elif path.suffix in WEIGHT_SUFFIXES:
            total += path.stat().st_size
    return total


def load_tokenizer(model_id: str, options: PipelineOptions) -> Any:
    """The tokenizer that bounds a prompt's length, alone, for counting its chunks without
    loading the weights: the (first) CLIP one, a flow model's T5 one (`prompt_tokenizer`)."""
    source = _model_folder(model_id, options)
    index = _model_index(source)
    name = PROMPT_TOKENIZERS.get(pipeline_family(model_id, source), "tokenizer")
    kind = index.get(name)
    if not kind:
        raise _not_available(model_id, options, "its tokenizer is not on this machine")
    return getattr(transformers, kind[1]).from_pretrained(Path(source) / name)


def load_pipeline(model_id: str, options: PipelineOptions) -> DiffusionPipeline:
    """Load a text-to-image pipeline from a Hub id, a local folder or a built-in source
    (`tiny`, `tiny-sdxl`: built locally first, then loaded exactly like a real model), ready
    to call on the device; its class comes from the model's model_index.json."""
    device, dtype = resolve_device(options.device, options.dtype)
    source = _model_folder(model_id, options)
    family = pipeline_family(model_id, source)
    extra: dict[str, Any] = {}
    if family is StableDiffusionPipeline and not options.safety_checker:
        extra = {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = family.from_pretrained(
            source,
            dtype=dtype,
            cache_dir=str(options.cache_dir),
            local_files_only=True,
            revision=options.revision,  # never another commit's snapshot, if it is cached
            **extra,
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
    unet = getattr(pipe, "unet", None)  # a flow model has a transformer instead
    if options.channels_last and unet is not None:
        unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if options.compile_unet:
        # One graph per (batch bucket, size): every size members use costs one compilation,
        # so allow more than torch's default of 8 before it falls back to eager.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        (unet or pipe.transformer).compile(backend=options.compile_backend, dynamic=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_file(source: str, options: PipelineOptions) -> Path:
    """The .safetensors file of a LoRA: a built-in (built on first use), a local file or
    folder, or a Hub id's cached snapshot (at `options.revision`, if pinned). Never downloads;
    safetensors only."""
    built = built_in(source, options.cache_dir, BUILT_IN_LORAS)
    if built is not None:
        return built
    if looks_like_path(source):
        path = Path(source).expanduser()
    else:
        snapshot = cached_lora(source, options.cache_dir, options.revision)
        if snapshot is None:
            at = "" if options.revision is None else f" at {options.revision}"
            raise ModelNotAvailable(
                f"LoRA {source!r}{at} is not on this machine; fetch it with "
                "`python -m bot download`."
            )
        path = snapshot
    if path.is_file() and path.suffix == ".safetensors":
        return path
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    preferred = [file for file in files if file.name == LORA_WEIGHT_NAME]
    if len(preferred or files) != 1:
        found = ", ".join(file.name for file in files) or "none"
        raise ModelNotAvailable(
            f"LoRA {source!r} needs one .safetensors file (or {LORA_WEIGHT_NAME}); found {found}."
        )
    return (preferred or files)[0]
