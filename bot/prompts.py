"""The prompt language: Midjourney-style flags, `{a, b}` permutations and AUTOMATIC1111's
`(word:1.3)` weights.

Pure Python, like bot/requests.py: the cogs parse what a member typed here, the service checks
the weights of every prompt that reaches validation, and bot/pipelines/prompt_encoding.py
turns the same weights into embeddings. Every parser is a single left-to-right pass over text
already bounded to MAX_PROMPT_CHARS, and every refusal is an InvalidRequest naming the flag or
the character position to fix.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any

from bot.requests import ALL_SCHEDULERS, MAX_PROMPT_CHARS, InvalidRequest, Limits, RawOptions

# Flags a member may write in a prompt, and the request option each one sets.
FLAG_OPTIONS: dict[str, str] = {
    "ar": "width and height",
    "no": "negative_prompt",
    "seed": "seed",
    "steps": "steps",
    "guidance": "guidance",
    "cfg": "guidance",
    "scheduler": "scheduler",
    "count": "count",
    "strength": "strength",
    "model": "model",
    "lora": "loras",
    "repeat": "repeat",
}
KNOWN_FLAGS = ", ".join(f"--{name}" for name in FLAG_OPTIONS)
# No flag's value needs more characters (a seed has 10 digits); longer is refused unparsed.
MAX_FLAG_VALUE = 24
# Except names from the allowlist: a model, or LoRAs as `name:weight` joined by commas.
MAX_NAMES_VALUE = 200
MAX_FLAG_NAME = 20
# `(word)` multiplies by this, `[word]` divides by it, as in AUTOMATIC1111.
NEST_WEIGHT = 1.1
# Past this an embedding is mostly noise, and a long nesting would overflow: refused.
MAX_WEIGHT = 5.0
BREAK = "BREAK"

# A flag starts a word: `--ar`, or `—ar` (phones turn two hyphens into an em dash).
_FLAG = re.compile(r"(?:(?<=\s)|^)(?:--|—)([A-Za-z][A-Za-z0-9_]*)")
_WHOLE = re.compile(r"\d{1,12}")
_NUMBER = re.compile(r"\d{1,6}(?:\.\d{1,6})?|\.\d{1,6}")
_ASPECT = re.compile(r"(\d{1,4}):(\d{1,4})")
# AUTOMATIC1111's attention grammar, with `\{` `\}` escapes added for permutation braces.
_WEIGHT_TOKEN = re.compile(r"\\[\\()\[\]{}]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|\]|[^\\()\[\]:]+|:")
_BREAK = re.compile(rf"\s*\b{BREAK}\b\s*")


def _shown(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _scheduler_name(value: str) -> str:
    """`dpm++2m`, `euler_a` or `Euler-a` name the scheduler `DPM++ 2M` or `Euler a`."""
    wanted = re.sub(r"[^a-z0-9+]", "", value.lower())
    for name in ALL_SCHEDULERS:
        if re.sub(r"[^a-z0-9+]", "", name.lower()) == wanted:
            return name
    allowed = ", ".join(n.replace(" ", "") for n in ALL_SCHEDULERS)
    raise InvalidRequest("--scheduler", f"must be one of: {allowed}; got {value!r}.")


def _typed(flag: str, value: str) -> Any:
    """A flag's value as the option it sets takes it; ranges are checked by `validate`."""
    if flag in ("seed", "steps", "count", "repeat"):
        if not _WHOLE.fullmatch(value):
            raise InvalidRequest(f"--{flag}", f"must be a whole number, got {value!r}.")
        return int(value)
    if flag in ("guidance", "cfg", "strength"):
        if not _NUMBER.fullmatch(value):
            raise InvalidRequest(f"--{flag}", f"must be a number, got {value!r}.")
        return float(value)
    if flag == "scheduler":
        return _scheduler_name(value)
    if flag in ("model", "lora"):
        return value  # names the allowlist checks in validation, like the options they set
    match = _ASPECT.fullmatch(value)
    if match is None or int(match[1]) == 0 or int(match[2]) == 0:
        raise InvalidRequest("--ar", f"must be two whole numbers like 3:2, got {value!r}.")
    return int(match[1]), int(match[2])


def aspect_size(across: int, down: int, limits: Limits) -> tuple[int, int]:
    """The size of ratio `across`:`down` with about the model's default pixel count, sides
    multiples of 8 within the limits (grown or shrunk as a whole to fit them)."""
    widest = limits.max_side / limits.min_side
    ratio = across / down
    if not 1 / widest <= ratio <= widest:
        raise InvalidRequest(
            "--ar", f"must be between 1:{widest:g} and {widest:g}:1 here, got {across}:{down}."
        )
    width = math.sqrt(limits.default_width * limits.default_height * ratio)
    height = width / ratio
    scale = min(1.0, limits.max_side / max(width, height))
    scale = max(scale, limits.min_side / min(width, height))

    def snap(side: float) -> int:
        return min(max(round(side * scale / 8) * 8, limits.min_side), limits.max_side)

    return snap(width), snap(height)


@dataclass(frozen=True)
class PromptFlags:
    """The flags of one prompt: options by RawOptions field, `--no` text, `--repeat`."""

    options: dict[str, Any] = field(default_factory=dict)
    written: dict[str, str] = field(default_factory=dict)  # field → the flag as the member wrote
    aspect: tuple[int, int] | None = None
    negative: str = ""
    repeat: int = 1

    def shown(self) -> list[str]:
        """The flags as a member would write them, for the dry run."""
        shown = [f"{self.written[name]} {value}" for name, value in self.options.items()]
        if self.aspect:
            shown.append(f"--ar {self.aspect[0]}:{self.aspect[1]}")
        if self.negative:
            shown.append(f"--no {self.negative}")
        if self.repeat > 1:
            shown.append(f"--repeat {self.repeat}")
        return shown

    def apply(self, raw: RawOptions, limits: Limits, *, override: bool = False) -> RawOptions:
        """`raw` with the flags set. A flag that contradicts an option the member gave is
        refused naming both, unless `override` (options inherited from an earlier job)."""
        changes = dict(self.options)
        written = dict(self.written)
        if self.aspect is not None:
            changes["width"], changes["height"] = aspect_size(*self.aspect, limits)
            written["width"] = written["height"] = "--ar"
        if override and "model" in changes and "loras" not in changes:
            changes["loras"] = None  # inherited LoRAs were chosen for the earlier model
        if not override:
            for name, value in changes.items():
                given = getattr(raw, name)
                if given is not None and given != value:
                    raise InvalidRequest(
                        written[name],
                        f"sets {name} to {value} but the `{name}` option says "
                        f"{_shown(str(given), MAX_FLAG_VALUE)}; give only one of them.",
                    )
        if self.negative:
            before = raw.negative_prompt if isinstance(raw.negative_prompt, str) else ""
            changes["negative_prompt"] = ", ".join(t for t in (before.strip(), self.negative) if t)
        return replace(raw, **changes)


def split_flags(text: str) -> tuple[str, PromptFlags]:
    """Split `a fox --ar 3:2 --no blur, text --seed 7` into the prompt (`a fox`) and its
    flags. A flag takes the word after it; `--no` takes the text up to the next flag."""
    if not isinstance(text, str):
        raise InvalidRequest("prompt", "must be text.")
    if len(text) > MAX_PROMPT_CHARS:
        raise InvalidRequest(
            "prompt", f"is {len(text)} characters long; at most {MAX_PROMPT_CHARS} are allowed."
        )
    starts = list(_FLAG.finditer(text))
    kept = [text[: starts[0].start()] if starts else text]
    options: dict[str, Any] = {}
    written: dict[str, str] = {}
    aspect, negatives, repeat = None, [], 1
    for match, following in itertools.zip_longest(starts, starts[1:]):
        name = match[1].lower()
        flag = f"--{_shown(match[1], MAX_FLAG_NAME)}"
        if name not in FLAG_OPTIONS:
            raise InvalidRequest(flag, f"is not a flag I know; use {KNOWN_FLAGS}.")
        argument = text[match.end() : following.start() if following else len(text)].strip()
        if name == "no":
            if not argument:
                raise InvalidRequest(flag, "needs the text to keep out, like `--no blur`.")
            negatives.append(argument)
            continue
        if not argument:
            raise InvalidRequest(flag, "needs a value.")
        value, *rest = argument.split(maxsplit=1)
        kept += rest
        longest = MAX_NAMES_VALUE if name in ("model", "lora") else MAX_FLAG_VALUE
        if len(value) > longest:
            raise InvalidRequest(flag, f"is {len(value)} characters long; at most {longest}.")
        option = {"cfg": "guidance", "lora": "loras"}.get(name, name)
        if option in written or (name == "ar" and aspect is not None):
            raise InvalidRequest(flag, "is given twice; give it once.")
        typed = _typed(name, value)
        if name == "ar":
            aspect = typed
        elif name == "repeat":
            repeat = typed
            written[option] = flag
        else:
            options[option] = typed
            written[option] = flag
    written.pop("repeat", None)
    prompt = " ".join(part.strip() for part in kept if part.strip())
    return prompt, PromptFlags(options, written, aspect, ", ".join(negatives), repeat)


def _permutation_pieces(text: str) -> list[list[str]]:
    """`a {red, blue} car` → [["a "], ["red", "blue"], [" car"]]. Escaped braces (`\\{`) are
    kept as written: the weight parser reads them as literal braces."""
    pieces: list[list[str]] = []
    literal: list[str] = []
    group: list[str] | None = None
    opened = 0
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            literal.append(text[index : index + 2])
            index += 2
            continue
        if char == "{":
            if group is not None:
                raise InvalidRequest("prompt", f"`{{` at position {index + 1} is inside a group.")
            pieces.append(["".join(literal)])
            literal, group, opened = [], [], index
        elif char == "}":
            if group is None:
                raise InvalidRequest(
                    "prompt", f"`}}` at position {index + 1} closes no group (write \\}} for one)."
                )
            group.append("".join(literal).strip())
            pieces.append(group)
            literal, group = [], None
        elif char == "," and group is not None:
            group.append("".join(literal).strip())
            literal = []
        else:
            literal.append(char)
        index += 1
    if group is not None:
        raise InvalidRequest(
            "prompt", f"`{{` at position {opened + 1} is never closed (write \\{{ for one)."
        )
    pieces.append(["".join(literal)])
    return pieces


@dataclass(frozen=True)
class ParsedPrompt:
    """What a member typed, parsed: the prompt without flags, its flags, and the prompts of
    the jobs it makes (permutations, each repeated)."""

    text: str
    flags: PromptFlags
    prompts: list[str]

    def requests(
        self,
        raw: RawOptions,
        limits: Limits,
        *,
        override: bool = False,
        prompts: list[str] | None = None,
    ) -> list[RawOptions]:
        """One RawOptions per job: `raw` with the flags applied (see `PromptFlags.apply`) and
        each prompt (`prompts`, default the parsed ones). With `--repeat` and a seed, repeats
        take the seeds after the first job's: a repeat is for new images."""
        base = self.flags.apply(raw, limits, override=override)
        jobs = []
        for index, prompt in enumerate(self.prompts if prompts is None else prompts):
            seed = base.seed
            if isinstance(seed, int) and not isinstance(seed, bool):
                count = base.count if isinstance(base.count, int) else 1
                seed += (index % self.flags.repeat) * count
            jobs.append(replace(base, prompt=prompt, seed=seed))
        return jobs


def parse_prompt(text: str, max_permutations: int) -> ParsedPrompt:
    """Flags, then permutations: at most `max_permutations` prompts, `--repeat` included."""
    prompt, flags = split_flags(text)
    if not 1 <= flags.repeat <= max_permutations:
        raise InvalidRequest("--repeat", f"must be from 1 to {max_permutations}.")
    pieces = _permutation_pieces(prompt)
    variants = math.prod(len(piece) for piece in pieces)  # counted before any is made
    if variants * flags.repeat > max_permutations:
        made = f"{variants} prompt(s)" if variants <= 10**6 else "over a million prompts"
        if flags.repeat > 1:
            made += f" × --repeat {flags.repeat}"
        raise InvalidRequest(
            "prompt", f"makes {made}; at most {max_permutations} jobs are allowed."
        )
    prompts = ["".join(choice) for choice in itertools.product(*pieces)]
    return ParsedPrompt(prompt, flags, [p for p in prompts for _ in range(flags.repeat)])


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text and the weight its tokens get."""

    text: str
    weight: float


def parse_weights(text: str, option: str = "prompt") -> list[list[Fragment]]:
    """AUTOMATIC1111's weights: `(a:1.3)`, `(a)` = ×1.1, `[a]` = ÷1.1, nesting multiplies,
    `\\(` is a literal bracket. Returns the chunks `BREAK` separates, each a list of
    fragments (adjacent equal weights merged). Unbalanced brackets are refused by position."""
    return _break_chunks(_weighted_runs(text, option), option)


def _weighted_runs(text: str, option: str) -> list[list[Any]]:
    """Runs of text as [text, weight, position]: the position lets a refusal point at it."""
    runs: list[list[Any]] = []
    opened: list[tuple[str, int, int]] = []  # (bracket, position, first run inside)
    for match in _WEIGHT_TOKEN.finditer(text):
        token, weight, position = match[0], match[1], match.start() + 1
        if token.startswith("\\") and len(token) == 2:
            runs.append([token[1], 1.0, position])
        elif token in ("(", "["):
            opened.append((token, position, len(runs)))
        elif weight is not None or token in (")", "]"):
            start = _close(opened, token, position, option)
            by = _bracket_weight(token, weight, position, option)
            for run in runs[start:]:
                run[1] *= by
        else:
            runs.append([token, 1.0, position])
    if opened:
        bracket, position, _ = opened[-1]
        closer = ")" if bracket == "(" else "]"
        raise InvalidRequest(
            option,
            f"`{bracket}` at position {position} is never closed by `{closer}` "
            f"(write \\{bracket} for a literal one).",
        )
    return runs


def _close(opened: list[tuple[str, int, int]], token: str, position: int, option: str) -> int:
    """The first run inside the bracket `token` closes; guessing would weight the wrong words."""
    opener = "[" if token == "]" else "("
    if not opened or opened[-1][0] != opener:
        raise InvalidRequest(
            option,
            f"`{token[-1]}` at position {position + len(token) - 1} closes no `{opener}` "
            f"(write \\{token[-1]} for a literal one).",
        )
    return opened.pop()[2]


def _bracket_weight(token: str, weight: str | None, position: int, option: str) -> float:
    """What a closing bracket multiplies by, refused past MAX_WEIGHT before it reaches a model."""
    if weight is None:
        return NEST_WEIGHT if token == ")" else 1 / NEST_WEIGHT
    try:
        by = float(weight)
    except ValueError:
        by = -1.0
    if not 0 <= by <= MAX_WEIGHT:
        raise InvalidRequest(
            option,
            f"the weight {weight!r} at position {position} must be a number "
            f"from 0 to {MAX_WEIGHT:g}.",
        )
    return by


def _break_chunks(runs: list[list[Any]], option: str) -> list[list[Fragment]]:
    """The runs as chunks `BREAK` separates, equal neighbours merged to spare the encoder."""
    chunks: list[list[Fragment]] = [[]]
    for piece, weight, position in runs:
        if weight > MAX_WEIGHT:
            raise InvalidRequest(
                option,
                f"weights multiply to {weight:.3g} at position {position}; at most "
                f"{MAX_WEIGHT:g} is allowed.",
            )
        for number, part in enumerate(_BREAK.split(piece)):
            if number:
                chunks.append([])
            current = chunks[-1]
            if current and current[-1].weight == weight:
                current[-1] = Fragment(current[-1].text + part, weight)
            elif part:
                current.append(Fragment(part, weight))
    return chunks


def weighted_terms(chunks: list[list[Fragment]]) -> list[str]:
    """The fragments whose weight is not 1, as `fox ×1.5`, for the dry run."""
    return [
        f"{f.text.strip()} ×{f.weight:.3g}"
        for chunk in chunks
        for f in chunk
        if f.weight != 1.0 and f.text.strip()
    ]
