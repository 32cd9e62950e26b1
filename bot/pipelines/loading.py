"""Loading a Stable Diffusion pipeline from a Hub id or a local folder, ready on its device.

Loading never downloads (bot/downloads.py does, on start or with `python -m bot download`):
a Hub model is loaded from its complete cached snapshot, and a model that is not on this
machine fails at start-up with the command that fetches it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
from diffusers import StableDiffusionPipeline
from huggingface_hub.errors import EntryNotFoundError, HFValidationError

from bot.downloads import ModelNotAvailable, cached_model, looks_like_path
from bot.pipelines.devices import resolve_device
from bot.pipelines.tiny import TINY_MODEL, build_tiny_model

__all__ = ["ModelNotAvailable", "PipelineOptions", "load_pipeline"]


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
    elif looks_like_path(model_id):
        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            raise _not_available(model_id, options, "no such folder")
        if not (folder / "model_index.json").is_file():
            raise _not_available(model_id, options, "the folder holds no model_index.json")
        source = str(folder)
    else:
        snapshot = cached_model(model_id, options.cache_dir)
        if snapshot is not None:
            source = str(snapshot)
    extra: dict[str, Any] = {}
    if not options.safety_checker:
        extra = {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=dtype, cache_dir=str(options.cache_dir), local_files_only=True, **extra
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
