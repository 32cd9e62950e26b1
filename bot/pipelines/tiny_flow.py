"""The built-in flow-matching models: `tiny-flux` (FLUX.1's architecture at toy size), random
weights from a fixed seed, built into the model cache on first use like `tiny` (tiny.py).

Its tokenizers are made here (CLIP's byte-level one from tiny.py, a T5-style unigram one over
single characters), so nothing is fetched: tests and offline trials load it through the same
code as a real FLUX.1 model.
"""

from __future__ import annotations

import string
from pathlib import Path

from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from bot.pipelines.tiny import (
    _SMALL,
    _refuse_foreign,
    _save_built,
    _text_ids,
    tiny_tokenizer,
    tiny_vae,
)

TINY_FLUX = "tiny-flux"
# The T5 sequence length of the tiny model (FLUX.1 reads 512 tokens, [schnell] 256).
TINY_T5_TOKENS = 32

# FLUX.1 [dev]'s scheduler_config.json: the shift grows with the image's token count.
FLUX_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5-style unigram tokenizer over single characters (pad 0, end 1, unknown 2, as T5's),
    so any text encodes offline; characters outside its table read as unknown."""
    symbols = ["▁", *string.ascii_letters, *string.digits, *string.punctuation]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *((s, -1.0) for s in symbols)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=TINY_T5_TOKENS)


def _tiny_flux_pipeline() -> FluxPipeline:
    """FLUX.1 [dev]'s architecture at toy size: a 16-channel VAE (2×2 patches make the
    transformer's 64 input channels), CLIP's pooled embedding and T5's sequence, a guidance
    embedding; random weights."""
    clip_tokenizer = tiny_tokenizer()
    t5_tokenizer = tiny_t5_tokenizer()
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,  # T5's d_model
        pooled_projection_dim=32,  # CLIP's hidden size
        guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    )
    vae = tiny_vae(
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,  # FLUX.1's VAE
        shift_factor=0.1159,
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            **_SMALL, **_text_ids(clip_tokenizer), num_hidden_layers=2, max_position_embeddings=77
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            is_encoder_decoder=False,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(FLUX_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )


def build_tiny_flux(folder: Path) -> Path:
    """Save the tiny random FLUX.1 model into `folder` (reused if already there)."""
    folder = Path(folder)
    if (folder / "model_index.json").is_file():
        return folder
    _refuse_foreign(folder, "model_index.json")
    return _save_built(folder, lambda staging: _tiny_flux_pipeline().save_pretrained(staging))
