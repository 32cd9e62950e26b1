"""Prompt embeddings the way AUTOMATIC1111 makes them: 75-token chunks, weights, any length.

Each chunk is BOS + 75 tokens (padded) + EOS, encoded on its own; `BREAK` starts a new chunk.
Weights (bot/prompts.py parses them) scale each token's embedding, then the chunk is rescaled
to its original mean. The chunks' embeddings are concatenated. For SDXL's two encoders the
penultimate hidden states of both are concatenated per chunk, and the pooled embedding is the
second encoder's for the first chunk.

Prompts in one call may have different chunk counts, yet an image must not depend on its
batch mates. Every prompt is therefore stretched to the call's common length by repeating its
own chunk sequence: cross-attention over keys and values each repeated k times gives the same
output as over the originals (every softmax weight is divided by k and counted k times).
Padding with empty chunks, the usual way, would change the image. The common length is the
least common multiple of the call's chunk counts; `call_groups` splits a call whose multiple
would grow past MAX_CALL_CHUNKS (only possible above MAX_PROMPT_CHUNKS=4).

Why not `compel`: its 2.5.1 release installs and runs with transformers 5, but it parses its
own syntax (`word++`, `(word)1.3`), not AUTOMATIC1111's `(word:1.3)`, `[word]` and `BREAK`;
it down-weights by blending masked sequences instead of scaling and restoring the mean; and
it pads long prompts with empty-prompt chunks, which makes an image depend on its batch. A
module of our own of this size keeps the seed promise and adds no dependency.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import torch

from bot.prompts import parse_weights

CHUNK_TOKENS = 75
# The largest common length (in chunks) one call is padded to; `call_groups` splits beyond.
MAX_CALL_CHUNKS = 12


@dataclass(frozen=True)
class TokenChunk:
    """One encoder input: CHUNK_TOKENS + 2 token ids and a weight per position."""

    ids: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def weighted(self) -> bool:
        return any(weight != 1.0 for weight in self.weights)


def tokenize_chunks(tokenizer: Any, text: str) -> list[TokenChunk]:
    """The chunks `text` takes with this tokenizer: at least one (an empty prompt is BOS, EOS
    and padding, as diffusers encodes it), one more per 75 tokens and per `BREAK`."""
    segments = parse_weights(text)
    fragments = [fragment for segment in segments for fragment in segment]
    encoded = (
        tokenizer([f.text for f in fragments], add_special_tokens=False, verbose=False)["input_ids"]
        if fragments
        else []
    )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    chunks: list[TokenChunk] = []
    position = 0
    for segment in segments:
        ids: list[int] = []
        weights: list[float] = []
        for fragment in segment:
            tokens = encoded[position]
            position += 1
            ids += tokens
            weights += [fragment.weight] * len(tokens)
        for start in range(0, max(len(ids), 1), CHUNK_TOKENS):
            part = ids[start : start + CHUNK_TOKENS]
            padding = CHUNK_TOKENS - len(part)
            chunks.append(
                TokenChunk(
                    (bos, *part, eos, *[pad] * padding),
                    (1.0, *weights[start : start + CHUNK_TOKENS], 1.0, *[1.0] * padding),
                )
            )
    return chunks


def common_length(counts: Sequence[int]) -> int:
    """The chunks every prompt of a call is stretched to: a multiple of each one's count."""
    return math.lcm(*counts) if counts else 1


def call_groups(counts: Sequence[int], limit: int = MAX_CALL_CHUNKS) -> list[list[int]]:
    """Indexes of a call's images (`counts[i]`: chunks image i needs, prompt and negative
    together) in groups whose common length stays within `limit` (or the largest count):
    one group unless chunk limits above the default allow awkward mixes."""
    bound = max(limit, *counts) if counts else limit
    groups: list[tuple[int, list[int]]] = []
    for index, count in enumerate(counts):
        for number, (length, members) in enumerate(groups):
            if math.lcm(length, count) <= bound:
                members.append(index)
                groups[number] = (math.lcm(length, count), members)
                break
        else:
            groups.append((count, [index]))
    return [members for _, members in groups]


def _tokenize(tokenizers: Sequence[Any], text: str) -> tuple[tuple[TokenChunk, ...], ...]:
    """Chunks per tokenizer; padded with empty chunks should two tokenizers differ."""
    per_tokenizer = [tokenize_chunks(tokenizer, text) for tokenizer in tokenizers]
    longest = max(len(chunks) for chunks in per_tokenizer)
    for tokenizer, chunks in zip(tokenizers, per_tokenizer, strict=True):
        chunks += tokenize_chunks(tokenizer, "")[:1] * (longest - len(chunks))
    return tuple(tuple(chunks) for chunks in per_tokenizer)


class PromptEncoder:
    """Encodes a call's prompts with one (SD 1.x/2.x) or two (SDXL) tokenizer and text encoder
    pairs. Runs in the device's worker thread; the tokenizers are not shared with counting."""

    def __init__(
        self,
        tokenizers: Sequence[Any],
        text_encoders: Sequence[Any],
        *,
        penultimate: bool = False,
        zero_empty_negative: bool = False,
    ) -> None:
        if len(tokenizers) != len(text_encoders) or not tokenizers:
            raise ValueError("need one tokenizer per text encoder")
        self.tokenizers = list(tokenizers)
        self.text_encoders = list(text_encoders)
        self.penultimate = penultimate
        self.zero_empty_negative = zero_empty_negative
        # Cached on a function of the tokenizers alone: a bound method would make a reference
        # cycle that keeps the text encoders alive after the runner unloads the model.
        self._chunks = lru_cache(maxsize=256)(partial(_tokenize, tuple(self.tokenizers)))

    @classmethod
    def for_pipeline(cls, pipe: Any) -> PromptEncoder:
        """SD 1.x/2.x: the last hidden state; SDXL (a second encoder): penultimate states."""
        second = getattr(pipe, "text_encoder_2", None)
        if second is None:
            return cls([pipe.tokenizer], [pipe.text_encoder])
        pairs = [(t, e) for t, e in ((pipe.tokenizer, pipe.text_encoder),) if e is not None]
        pairs.append((pipe.tokenizer_2, second))
        return cls(
            [t for t, _ in pairs],
            [e for _, e in pairs],
            penultimate=True,
            zero_empty_negative=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)),
        )

    def chunk_count(self, text: str) -> int:
        return len(self._chunks(text)[0])

    def _encode_unique(self, texts: list[str]) -> dict[str, tuple[torch.Tensor, Any]]:
        """Each distinct text's embeddings (chunks × 77 positions, features) and pooled
        embedding, all chunks of all texts through each encoder in one batch."""
        tokenized = [self._chunks(text) for text in texts]
        hidden: list[torch.Tensor] = []
        pooled = None
        for number, encoder in enumerate(self.text_encoders):
            chunks = [chunk for per_encoder in tokenized for chunk in per_encoder[number]]
            ids = torch.tensor([chunk.ids for chunk in chunks], device=encoder.device)
            output = encoder(ids, output_hidden_states=self.penultimate)
            hidden.append(output.hidden_states[-2] if self.penultimate else output[0])
            if hasattr(output, "text_embeds"):
                pooled = output.text_embeds
        states = torch.cat(hidden, dim=-1)
        first_chunks = [per_encoder[0] for per_encoder in tokenized]
        states = _apply_weights(states, [c for chunks in first_chunks for c in chunks])
        result: dict[str, tuple[torch.Tensor, Any]] = {}
        start = 0
        for text, chunks in zip(texts, first_chunks, strict=True):
            end = start + len(chunks)
            embeds = states[start:end].reshape(-1, states.shape[-1])
            result[text] = (embeds, None if pooled is None else pooled[start])
            start = end
        return result

    def arguments(self, prompts: list[str], negatives: list[str]) -> dict[str, torch.Tensor]:
        """The pipeline call's embedding arguments for these prompts and negative prompts,
        every one stretched to the call's common length (see the module docstring)."""
        with torch.no_grad():
            encoded = self._encode_unique(list(dict.fromkeys([*prompts, *negatives])))
        length = common_length([len(e) // (CHUNK_TOKENS + 2) for e, _ in encoded.values()])

        def stretched(text: str, zero: bool) -> tuple[torch.Tensor, Any]:
            embeds, pooled = encoded[text]
            embeds = embeds.repeat(length * (CHUNK_TOKENS + 2) // len(embeds), 1)
            if zero and pooled is not None:
                pooled = torch.zeros_like(pooled)
            return (torch.zeros_like(embeds) if zero else embeds), pooled

        positive = [stretched(text, False) for text in prompts]
        negative = [stretched(text, self.zero_empty_negative and not text) for text in negatives]
        arguments = {
            "prompt_embeds": torch.stack([embeds for embeds, _ in positive]),
            "negative_prompt_embeds": torch.stack([embeds for embeds, _ in negative]),
        }
        if positive[0][1] is not None:
            arguments["pooled_prompt_embeds"] = torch.stack([pooled for _, pooled in positive])
            arguments["negative_pooled_prompt_embeds"] = torch.stack(
                [pooled for _, pooled in negative]
            )
        return arguments


def _apply_weights(states: torch.Tensor, chunks: list[TokenChunk]) -> torch.Tensor:
    """Scale each token's embedding by its weight, then restore each chunk's mean, as
    AUTOMATIC1111 does; chunks without weights are left exactly as encoded."""
    if not any(chunk.weighted for chunk in chunks):
        return states
    states = states.clone()
    for index, chunk in enumerate(chunks):
        if not chunk.weighted:
            continue
        original = states[index]
        weights = torch.tensor(chunk.weights, dtype=original.dtype, device=original.device)
        scaled = original * weights[:, None]
        before, after = original.float().mean(), scaled.float().mean()
        if after != 0 and torch.isfinite(after):
            scaled = scaled * (before / after).to(original.dtype)
        states[index] = scaled
    return states
