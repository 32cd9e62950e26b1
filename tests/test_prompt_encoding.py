"""Long and weighted prompts as embeddings (bot/pipelines/prompt_encoding.py), on the tiny
model through the real runner, and on tiny SDXL text encoders built here."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention_processor import Attention
from factories import pixels
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from bot.pipelines import PipelineRunner
from bot.pipelines.prompt_encoding import (
    CHUNK_TOKENS,
    PromptEncoder,
    call_groups,
    common_length,
    tokenize_chunks,
)
from bot.pipelines.tiny import tiny_tokenizer
from bot.requests import BatchKey, ImageSpec

POSITIONS = CHUNK_TOKENS + 2


def words(tokens: int, word: str = "abcd") -> str:
    """Text of exactly `tokens` tiny-model tokens (one per character, spaces free)."""
    whole, rest = divmod(tokens, len(word))
    return " ".join([word] * whole + (["x" * rest] if rest else []))


def key(scheduler: str = "DPM++ 2M") -> BatchKey:
    return BatchKey(model="tiny", mode="text", width=64, height=64, steps=4, scheduler=scheduler)


def alone_and_batched(runner: PipelineRunner, specs: list[ImageSpec], scheduler: str) -> None:
    batch = runner.generate(key(scheduler), specs)
    for spec, in_batch in zip(specs, batch, strict=True):
        (alone,) = runner.generate(key(scheduler), [spec])
        assert np.abs(pixels(alone) - pixels(in_batch)).max() <= 1, spec.prompt[:40]


@pytest.fixture(scope="module")
def encoder(tiny_runner: PipelineRunner) -> PromptEncoder:
    pipe = tiny_runner.load("tiny")
    return PromptEncoder([pipe.tokenizer], [pipe.text_encoder])


# ---- chunks ----------------------------------------------------------------------------------


def test_a_chunk_is_bos_75_tokens_eos_with_padding(tiny_runner: PipelineRunner) -> None:
    tokenizer = tiny_runner.load("tiny").tokenizer
    [empty] = tokenize_chunks(tokenizer, "")
    native = tokenizer("", padding="max_length", max_length=POSITIONS).input_ids
    assert list(empty.ids) == native and set(empty.weights) == {1.0}
    [full] = tokenize_chunks(tokenizer, words(75))
    assert len(full.ids) == POSITIONS and full.ids[0] == tokenizer.bos_token_id
    assert full.ids[-1] == tokenizer.eos_token_id
    first, second = tokenize_chunks(tokenizer, words(76))
    assert first.ids[-1] == tokenizer.eos_token_id and second.ids[2] == tokenizer.eos_token_id
    for text, chunks in [("", 1), (words(75), 1), (words(76), 2), (words(300), 4)]:
        assert tiny_runner.prompt_chunks("tiny", text) == chunks
    assert tiny_runner.prompt_chunks("tiny", "a red fox BREAK a blue sky") == 2
    assert tiny_runner.prompt_chunks("tiny", f"{words(80)} BREAK x") == 3


def test_escaped_parentheses_are_literal_tokens(tiny_runner: PipelineRunner) -> None:
    tokenizer = tiny_runner.load("tiny").tokenizer
    [chunk] = tokenize_chunks(tokenizer, r"\(fox\)")
    native = tokenizer("(fox)", padding="max_length", max_length=POSITIONS).input_ids
    assert list(chunk.ids) == native and not chunk.weighted
    [weighted] = tokenize_chunks(tokenizer, "(fox)")
    assert weighted.ids != chunk.ids and weighted.weighted


def test_one_chunk_is_exactly_what_diffusers_encodes(
    tiny_runner: PipelineRunner, encoder: PromptEncoder
) -> None:
    pipe = tiny_runner.load("tiny")
    prompts, negatives = ["a red fox", "x", words(75)], ["", "blurry", "ugly, bad"]
    theirs, their_negatives = pipe.encode_prompt(prompts, "cpu", 1, True, negatives)
    ours = encoder.arguments(prompts, negatives)
    # Equal up to float rounding: diffusers encodes the prompts and the negatives as two
    # batches, this module every distinct text as one.
    assert (ours["prompt_embeds"] - theirs).abs().max() < 1e-5
    assert (ours["negative_prompt_embeds"] - their_negatives).abs().max() < 1e-5
    assert "pooled_prompt_embeds" not in ours


def test_weights_scale_tokens_and_restore_each_chunks_mean(encoder: PromptEncoder) -> None:
    def embeds(text: str) -> torch.Tensor:
        return encoder.arguments([text], [""])["prompt_embeds"][0]

    plain, weighted = embeds("a fox in snow"), embeds("a (fox:1.5) in snow")
    assert not torch.allclose(plain, weighted)
    assert torch.allclose(plain.mean(), weighted.mean(), rtol=1e-5)
    assert torch.equal(embeds("a (fox:1) in snow"), plain)  # weight 1 changes nothing
    # A weight in the second chunk leaves the first exactly as encoded.
    long_plain, long_weighted = embeds(f"{words(75)} fox"), embeds(f"{words(75)} (fox:0.5)")
    assert torch.equal(long_plain[:POSITIONS], long_weighted[:POSITIONS])
    assert not torch.allclose(long_plain[POSITIONS:], long_weighted[POSITIONS:])


def test_every_prompt_of_a_call_is_stretched_by_repeating_its_own_chunks(
    encoder: PromptEncoder,
) -> None:
    one, three = "a fox", words(200)
    alone = encoder.arguments([one], [""])["prompt_embeds"][0]
    both = encoder.arguments([one, three], ["", words(100)])
    assert both["prompt_embeds"].shape[1] == both["negative_prompt_embeds"].shape[1] == 6 * 77
    stretched = both["prompt_embeds"][0]
    assert all(torch.equal(stretched[i * POSITIONS : (i + 1) * POSITIONS], alone) for i in range(6))
    assert common_length([1, 3, 2, 4]) == 12 and common_length([]) == 1


def test_repeated_keys_and_values_leave_cross_attention_unchanged() -> None:
    torch.manual_seed(0)
    attention = Attention(query_dim=32, cross_attention_dim=64, heads=4, dim_head=8)
    hidden, context = torch.randn(2, 16, 32), torch.randn(2, 2 * POSITIONS, 64)
    with torch.no_grad():
        once = attention(hidden, encoder_hidden_states=context)
        thrice = attention(hidden, encoder_hidden_states=context.repeat(1, 3, 1))
    assert torch.allclose(once, thrice, atol=1e-6)


def test_call_groups_keep_the_common_length_bounded() -> None:
    assert call_groups([1, 3, 2, 4, 1]) == [[0, 1, 2, 3, 4]]  # lcm 12: one call
    assert call_groups([4, 5, 1, 3]) == [[0, 2, 3], [1]]
    assert call_groups([16, 3, 16]) == [[0, 2], [1]]
    assert call_groups([]) == []


# ---- pixels through the runner ---------------------------------------------------------------


@pytest.mark.parametrize("scheduler", ["DPM++ 2M", "Euler a"])
def test_a_batch_mixing_chunk_counts_gives_each_image_its_own_pixels(
    tiny_runner: PipelineRunner, scheduler: str
) -> None:
    specs = [
        ImageSpec("a red fox", "", 11),
        ImageSpec(words(200), "blurry", 22),  # 3 chunks
        ImageSpec(f"a fox {words(90)}", words(80), 33),  # 2 chunks, negative too
        ImageSpec("(an owl:1.3) BREAK at night", words(160), 44),  # 2 and 3
    ]
    alone_and_batched(tiny_runner, specs, scheduler)


def test_text_after_the_75th_token_changes_the_image(tiny_runner: PipelineRunner) -> None:
    head = words(80)
    fox, owl = tiny_runner.generate(
        key(), [ImageSpec(f"{head} fox", "", 5), ImageSpec(f"{head} owl", "", 5)]
    )
    assert np.abs(pixels(fox) - pixels(owl)).mean() > 1


def test_a_call_past_the_common_length_cap_is_split_and_kept_in_order(
    tiny_runner: PipelineRunner,
) -> None:
    specs = [
        ImageSpec(words(300), "", 1),  # 4 chunks
        ImageSpec(words(375), "", 2),  # 5 chunks: lcm 20 would pass the cap of 12
        ImageSpec("a fox", "", 3),
    ]
    steps: list[tuple[int, int, object]] = []
    results = tiny_runner.generate(
        key(), specs, progress=lambda d, t, p=None: steps.append((d, t, p)), preview_every=2
    )
    assert len(steps) == 8 and all(previews is None for _, _, previews in steps)
    for spec, result in zip(specs, results, strict=True):
        (alone,) = tiny_runner.generate(key(), [spec])
        assert np.abs(pixels(alone) - pixels(result)).max() <= 1


# ---- SDXL's two encoders ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl_pipe() -> SimpleNamespace:
    """SDXL's text side at toy size: CLIP ViT-L-like and bigG-like encoders, the second with
    a projection (the pooled embedding) and "!" as its padding, as SDXL ships them."""
    first = tiny_tokenizer()
    vocab = first.get_vocab()
    second = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77, pad_token="!")
    ids = {
        "vocab_size": len(first),
        "bos_token_id": first.bos_token_id,
        "eos_token_id": first.eos_token_id,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = {"num_hidden_layers": 2, "max_position_embeddings": 77, "num_attention_heads": 4}
        text_encoder = CLIPTextModel(
            CLIPTextConfig(**ids, **config, hidden_size=32, intermediate_size=37)
        )
        text_encoder_2 = CLIPTextModelWithProjection(
            CLIPTextConfig(**ids, **config, hidden_size=48, intermediate_size=37, projection_dim=16)
        )
    return SimpleNamespace(
        tokenizer=first,
        text_encoder=text_encoder.eval(),
        tokenizer_2=second,
        text_encoder_2=text_encoder_2.eval(),
        config=SimpleNamespace(force_zeros_for_empty_prompt=True),
        unet=None,
        _execution_device=torch.device("cpu"),
        _lora_scale=None,
    )


def test_sdxl_one_chunk_is_exactly_what_diffusers_encodes(sdxl_pipe: SimpleNamespace) -> None:
    encoder = PromptEncoder.for_pipeline(sdxl_pipe)
    with torch.no_grad():
        theirs = StableDiffusionXLPipeline.encode_prompt(
            sdxl_pipe, "a red fox", device=torch.device("cpu"), negative_prompt="blurry"
        )
        # No negative prompt: diffusers zeroes it, as the model's config asks.
        empty_negative = StableDiffusionXLPipeline.encode_prompt(
            sdxl_pipe, "a red fox", device=torch.device("cpu"), negative_prompt=None
        )
    ours = encoder.arguments(["a red fox"], ["blurry"])
    names = [
        "prompt_embeds",
        "negative_prompt_embeds",
        "pooled_prompt_embeds",
        "negative_pooled_prompt_embeds",
    ]
    for name, tensor in zip(names, theirs, strict=True):
        assert torch.allclose(ours[name], tensor, atol=1e-6), name
    zeros = encoder.arguments(["a red fox"], [""])
    assert torch.equal(zeros["negative_prompt_embeds"], empty_negative[1])
    assert torch.equal(zeros["negative_pooled_prompt_embeds"], empty_negative[3])
    assert not zeros["negative_pooled_prompt_embeds"].any()


def test_sdxl_long_prompts_concatenate_chunks_and_pool_the_first(
    sdxl_pipe: SimpleNamespace,
) -> None:
    encoder = PromptEncoder.for_pipeline(sdxl_pipe)
    long_prompt = f"a red fox {words(160)}"  # 3 chunks
    both = encoder.arguments(["a red fox", long_prompt], ["", "blurry"])
    assert both["prompt_embeds"].shape == (2, 3 * POSITIONS, 32 + 48)
    assert both["pooled_prompt_embeds"].shape == (2, 16)
    short = encoder.arguments(["a red fox"], [""])
    assert torch.equal(both["prompt_embeds"][0], short["prompt_embeds"][0].repeat(3, 1))
    # Pooled from the first chunk, as the second encoder projects it.
    ids = tokenize_chunks(sdxl_pipe.tokenizer_2, long_prompt)[0].ids
    with torch.no_grad():
        expected = sdxl_pipe.text_encoder_2(torch.tensor([ids])).text_embeds[0]
    assert torch.allclose(both["pooled_prompt_embeds"][1], expected, atol=1e-6)
    assert encoder.chunk_count(long_prompt) == 3
