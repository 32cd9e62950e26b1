"""The built-in sources: `tiny` (SD 1.x's architecture at toy size), `tiny-sdxl` (SDXL's, both
text encoders) and `tiny-lora` (a LoRA for `tiny`), random weights from a fixed seed.

Saved to disk and loaded through the same code as real models and LoRAs, so tests and offline
smoke runs exercise the real loading path without downloading weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from bot.downloads import TINY_MODEL as TINY_MODEL  # its name, shared with the downloader

TINY_SDXL = "tiny-sdxl"
TINY_LORA = "tiny-lora"
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the name diffusers saves a LoRA as

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

# SDXL 1.0 base's scheduler_config.json, less the keys Euler does not read.
SDXL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
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


def _text_ids(tokenizer: CLIPTokenizer) -> dict[str, int]:
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


_SMALL = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4}


def _tiny_unet() -> UNet2DConditionModel:
    """SD 1.x's UNet at toy size; `tiny-lora` targets its attention projections."""
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_vae(latent_channels: int = 4, **config: Any) -> AutoencoderKL:
    """Four blocks give SD's VAE scale factor of 8: 64×64 pixels ↔ 8×8 latents (FLUX's has
    16 latent channels)."""
    return AutoencoderKL(
        sample_size=64,
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        layers_per_block=1,
        norm_num_groups=4,
        **config,
    )


def _tiny_pipeline(with_safety_checker: bool) -> StableDiffusionPipeline:
    """SD 1.x's architecture at toy size: same classes and latent geometry, random weights."""
    tokenizer = tiny_tokenizer()
    ids = _text_ids(tokenizer)
    # Built in this order: the seed then gives every release the same weights (and pixels).
    unet = _tiny_unet()
    vae = tiny_vae()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(**_SMALL, **ids, num_hidden_layers=2, max_position_embeddings=77)
    )
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    safety_checker = feature_extractor = None
    if with_safety_checker:
        safety_checker = StableDiffusionSafetyChecker(
            CLIPConfig(
                text_config={**_SMALL, **ids, "num_hidden_layers": 1},
                vision_config={**_SMALL, "num_hidden_layers": 1, "image_size": 32, "patch_size": 8},
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


def _tiny_sdxl_pipeline() -> StableDiffusionXLPipeline:
    """SDXL's architecture at toy size: two text encoders (the second with a projection that
    gives the pooled embedding), a UNet conditioned on text and time ids, random weights."""
    tokenizer = tiny_tokenizer()
    text = CLIPTextConfig(
        **_SMALL,
        **_text_ids(tokenizer),
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        # Six time ids (original size, crop corner, target size) of 8 each, plus the pooled 32.
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,  # both encoders' hidden states side by side
        norm_num_groups=32,
    )
    return StableDiffusionXLPipeline(
        vae=tiny_vae(scaling_factor=0.13025, force_upcast=True),
        text_encoder=CLIPTextModel(text),
        text_encoder_2=CLIPTextModelWithProjection(text),
        tokenizer=tokenizer,
        tokenizer_2=tiny_tokenizer(),
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
        add_watermarker=False,
    )


def _save_built(folder: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(staging)` beside `folder` and rename it into place, so an interrupted build
    never looks complete; weights come from a fixed seed, so every build is the same."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            build(staging)
        if folder.exists():
            folder.rmdir()
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _refuse_foreign(folder: Path, marker: str) -> None:
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty but holds no {marker}.")


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
    _refuse_foreign(folder, "model_index.json")
    return _save_built(
        folder, lambda staging: _tiny_pipeline(with_safety_checker).save_pretrained(staging)
    )


def build_tiny_sdxl(folder: Path) -> Path:
    """Save the tiny random SDXL model into `folder` (reused if already there)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    _refuse_foreign(folder, "model_index.json")
    return _save_built(folder, lambda staging: _tiny_sdxl_pipeline().save_pretrained(staging))


def save_random_lora(unet: UNet2DConditionModel, folder: Path, rank: int = 4) -> Path:
    """Save a LoRA for `unet`'s shapes as diffusers writes one: `rank` on every attention
    projection, random weights (no training), which change the pixels visibly."""
    # alpha = rank, the scale diffusers assumes when a file stores no alphas
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,  # random A and B: the adapter does something
        )
    )
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(unet), weight_name=LORA_WEIGHT_NAME
    )
    return folder / LORA_WEIGHT_NAME


def build_tiny_lora(folder: Path) -> Path:
    """Save a LoRA for `tiny` into `folder` (reused if already there); returns its file."""
    folder = Path(folder)
    weights = folder / LORA_WEIGHT_NAME
    if not weights.is_file():
        _refuse_foreign(folder, LORA_WEIGHT_NAME)
        _save_built(folder, lambda staging: save_random_lora(_tiny_unet(), staging))
    return weights


# Built-in sources: name → (folder in the model cache, builder). Loaded like any folder.
BUILT_IN_MODELS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    TINY_MODEL: ("tiny-sd", build_tiny_model),
    TINY_SDXL: ("tiny-sdxl", build_tiny_sdxl),
}
BUILT_IN_LORAS: dict[str, tuple[str, Callable[[Path], Path]]] = {
    TINY_LORA: ("tiny-lora", build_tiny_lora),
}


def built_in(
    name: str,
    cache_dir: Path,
    table: dict[str, tuple[str, Callable[[Path], Path]]] = BUILT_IN_MODELS,
) -> Path | None:
    """What a built-in source of `table` builds in the cache (a model's folder, a LoRA's file),
    built on first use; None when `name` is not one of them."""
    entry = table.get(name)
    if entry is None:
        return None
    folder, build = entry
    return build(Path(cache_dir) / folder)


TINY_INPAINT = "tiny-inpaint"


def build_tiny_inpaint(folder: Path) -> Path:
    """Save the tiny random inpainting model into `folder` (reused if already there): `tiny`
    with a 9-channel UNet (latents, mask, masked image), as SD's inpainting models have."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    _refuse_foreign(folder, "model_index.json")

    def build(staging: Path) -> None:
        base = _tiny_pipeline(with_safety_checker=False)
        unet = UNet2DConditionModel.from_config({**base.unet.config, "in_channels": 9})
        components = {**base.components, "unet": unet}
        pipe = StableDiffusionInpaintPipeline(**components, requires_safety_checker=False)
        pipe.save_pretrained(staging)

    return _save_built(folder, build)


BUILT_IN_MODELS[TINY_INPAINT] = ("tiny-inpaint", build_tiny_inpaint)
