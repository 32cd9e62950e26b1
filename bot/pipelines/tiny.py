"""The built-in tiny model: SD 1.x's architecture at toy size with random weights.

Saved to disk and loaded through the same code as real models, so tests and offline smoke
runs exercise the real loading path without downloading weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)

from bot.downloads import TINY_MODEL as TINY_MODEL  # its name, shared with the downloader

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
