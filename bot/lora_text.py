"""What a member types for LoRAs, checked as hostile: `lora:` text ("pixel-art:0.8 other") or
(name, weight) pairs from the command line or an image's parameters, bounded before it is
parsed and refused with `InvalidRequest` naming what is allowed; and the form of the names the
owner gives models and LoRAs. `Catalog.check_loras` (bot/models.py) then checks the names
against the allowlist. Pure Python."""

from __future__ import annotations

import math
import re
from typing import Any

from bot.requests import InvalidRequest

MAX_LORAS = 5  # per request: each one is loaded and fused for the call
MAX_NAME_CHARS = 64
MAX_LORA_WEIGHT = 2.0  # weights from −2 to 2; beyond that a LoRA only burns the image
# Longest `lora:` text worth parsing: every LoRA's name, a colon, a weight and a separator.
MAX_LORAS_TEXT = MAX_LORAS * (MAX_NAME_CHARS + 10)
# Owner-given names: what a member types, and what PNG parameters carry as `<lora:name:w>`,
# so no spaces, colons, commas or angle brackets.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SEPARATORS = re.compile(r"[\s,]+")

Loras = tuple[tuple[str, float], ...]


def shown(name: str) -> str:
    """A member's name echoed back, bounded so a refusal cannot be made arbitrarily long."""
    return repr(name[:MAX_NAME_CHARS] + ("…" if len(name) > MAX_NAME_CHARS else ""))


def _weight(name: str, value: Any) -> float:
    problem = f"the weight of {shown(name)} must be a number from -2 to 2"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest("lora", f"{problem}.")
    if not math.isfinite(value) or abs(value) > MAX_LORA_WEIGHT:
        raise InvalidRequest("lora", f"{problem}, got {value}.")
    return round(float(value), 2)


def _checked(pairs: list[tuple[str, float]]) -> Loras:
    if len(pairs) > MAX_LORAS:
        raise InvalidRequest("lora", f"at most {MAX_LORAS} LoRAs per request.")
    names = [name for name, _ in pairs]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise InvalidRequest("lora", f"{shown(twice)} is named twice; name each LoRA once.")
    return tuple(sorted(pairs))


def lora_pairs(value: Any) -> Loras:
    """(name, weight) pairs from the command line or read back from an image's parameters."""
    if not isinstance(value, list | tuple) or len(value) > MAX_LORAS:
        raise InvalidRequest("lora", f"give at most {MAX_LORAS} LoRAs as `name:weight`.")
    pairs = []
    for pair in value:
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise InvalidRequest("lora", "give each LoRA as `name:weight`.")
        pairs.append((pair[0], _weight(pair[0], pair[1])))
    return _checked(pairs)


def parse_loras(text: str) -> Loras:
    """`lora:` text as a member types it: `name` or `name:weight` (weight 1 by default),
    separated by spaces or commas. Bounded before it is split; sorted by name."""
    if len(text) > MAX_LORAS_TEXT:
        raise InvalidRequest(
            "lora", f"is {len(text)} characters long; at most {MAX_LORAS_TEXT} are allowed."
        )
    words = [word for word in _SEPARATORS.split(text) if word]
    if len(words) > MAX_LORAS:
        raise InvalidRequest("lora", f"at most {MAX_LORAS} LoRAs per request.")
    pairs = []
    for word in words:
        name, colon, weight_text = word.partition(":")
        if not NAME.fullmatch(name):
            raise InvalidRequest("lora", f"{shown(word)} is not `name` or `name:weight`.")
        weight: Any = 1.0
        if colon:
            try:
                weight = float(weight_text)
            except ValueError:
                weight = weight_text
        pairs.append((name, _weight(name, weight)))
    return _checked(pairs)
