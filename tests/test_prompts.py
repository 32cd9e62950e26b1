"""The prompt language's parsers (bot/prompts.py): flags, permutations, weights, and every way
they refuse. Pure Python: no model, no Discord."""

import random
import time

import pytest
from conftest import TEST_LIMITS

from bot.prompts import (
    KNOWN_FLAGS,
    MAX_WEIGHT,
    Fragment,
    aspect_size,
    parse_prompt,
    parse_weights,
    split_flags,
    weighted_terms,
)
from bot.requests import MAX_PROMPT_CHARS, InvalidRequest, Limits, RawOptions

SD15 = Limits()


def refusal(call, *args, **kwargs) -> str:
    with pytest.raises(InvalidRequest) as caught:
        call(*args, **kwargs)
    return str(caught.value)


def jobs(text: str, raw: RawOptions | None = None, *, override: bool = False, limit: int = 4):
    parsed = parse_prompt(text, limit)
    return parsed.requests(raw or RawOptions(prompt=text), SD15, override=override)


# ---- flags -----------------------------------------------------------------------------------


def test_flags_are_taken_out_of_the_prompt_and_typed():
    prompt, flags = split_flags(
        "a fox --ar 3:2 --seed 7 --no blur, text --cfg 5.5 --steps 30 in the snow"
    )
    assert prompt == "a fox in the snow"
    assert flags.options == {"seed": 7, "guidance": 5.5, "steps": 30}
    assert flags.aspect == (3, 2) and flags.negative == "blur, text" and flags.repeat == 1
    assert flags.written["guidance"] == "--cfg"


def test_every_flag_reaches_its_option():
    [raw] = jobs(
        "a fox --seed 7 --steps 12 --guidance 4 --scheduler euler_a --count 2 --strength 0.4 "
        "--ar 1:1 --no fog"
    )
    assert (raw.prompt, raw.seed, raw.steps, raw.guidance) == ("a fox", 7, 12, 4.0)
    assert (raw.scheduler, raw.count, raw.strength) == ("Euler a", 2, 0.4)
    assert (raw.width, raw.height, raw.negative_prompt) == (512, 512, "fog")


def test_model_and_lora_flags_set_their_options_and_a_new_model_drops_inherited_loras():
    [raw] = jobs("a fox --model tiny-sdxl --lora pixel-art:0.8,film")
    assert (raw.prompt, raw.model, raw.loras) == ("a fox", "tiny-sdxl", "pixel-art:0.8,film")
    message = refusal(jobs, "a fox --model tiny-sdxl", RawOptions(prompt="", model="tiny"))
    assert "`--model`" in message and "`model` option says tiny" in message
    parent = RawOptions(prompt="", model="tiny", loras=(("tiny-lora", 0.5),))
    [raw] = jobs("a fox --model tiny-sdxl", parent, override=True)
    assert (raw.model, raw.loras) == ("tiny-sdxl", None)
    [raw] = jobs("a fox --steps 3", parent, override=True)
    assert (raw.model, raw.loras) == ("tiny", (("tiny-lora", 0.5),))
    message = refusal(jobs, "a fox --lora " + "x" * 201)
    assert "`--lora`" in message and "at most 200" in message


def test_an_em_dash_counts_as_two_hyphens_and_flag_names_ignore_case():
    prompt, flags = split_flags("a fox —AR 16:9 —Seed 3")
    assert prompt == "a fox" and flags.aspect == (16, 9) and flags.options == {"seed": 3}


def test_hyphens_inside_words_are_not_flags():
    prompt, flags = split_flags("a well-lit room -- x--y --seed 1")
    assert prompt == "a well-lit room -- x--y" and flags.options == {"seed": 1}


@pytest.mark.parametrize(
    ("scheduler", "name"),
    [("dpm++2m", "DPM++ 2M"), ("Euler-a", "Euler a"), ("UNIPC", "UniPC"), ("ddim", "DDIM")],
)
def test_scheduler_names_without_spaces(scheduler, name):
    assert split_flags(f"x --scheduler {scheduler}")[1].options["scheduler"] == name


def test_no_is_appended_to_the_negative_prompt():
    [raw] = jobs("a fox --no blur", RawOptions(prompt="", negative_prompt="ugly"))
    assert raw.negative_prompt == "ugly, blur"
    [raw] = jobs("a fox --no blur --no text")
    assert raw.negative_prompt == "blur, text"


@pytest.mark.parametrize(
    ("text", "flag", "expected"),
    [
        ("a --foo 1", "--foo", KNOWN_FLAGS),
        ("a --" + "x" * 300, "--" + "x" * 20 + "…", "not a flag I know"),
        ("a --seed", "--seed", "needs a value"),
        ("a --no", "--no", "needs the text"),
        ("a --seed 7x", "--seed", "whole number, got '7x'"),
        ("a --seed -1", "--seed", "whole number"),
        ("a --steps 1e3", "--steps", "whole number"),
        ("a --cfg nan", "--cfg", "must be a number, got 'nan'"),
        ("a --strength 1e400", "--strength", "must be a number"),
        ("a --seed " + "9" * 30, "--seed", "30 characters long; at most 24"),
        ("a --seed 1 --seed 2", "--seed", "given twice"),
        ("a --cfg 1 --guidance 2", "--guidance", "given twice"),
        ("a --ar 1:1 --ar 2:1", "--ar", "given twice"),
        ("a --ar 3x2", "--ar", "like 3:2"),
        ("a --ar 0:1", "--ar", "like 3:2"),
        ("a --scheduler heun", "--scheduler", "DPM++2M"),
    ],
)
def test_bad_flags_are_refused_naming_the_flag(text, flag, expected):
    message = refusal(split_flags, text)
    assert message.startswith(f"`{flag}`") and expected in message


def test_text_longer_than_a_prompt_is_refused_before_parsing():
    message = refusal(split_flags, "--seed " + "1" * MAX_PROMPT_CHARS)
    assert f"at most {MAX_PROMPT_CHARS}" in message
    assert "must be text" in refusal(split_flags, 42)


def test_a_flag_that_contradicts_an_option_is_refused_naming_both():
    message = refusal(jobs, "a fox --seed 7", RawOptions(prompt="", seed=8))
    assert "`--seed`" in message and "`seed` option says 8" in message
    message = refusal(jobs, "a fox --cfg 5", RawOptions(prompt="", guidance=6))
    assert "`--cfg`" in message and "`guidance`" in message
    message = refusal(jobs, "a fox --ar 3:2", RawOptions(prompt="", width=512))
    assert "`--ar`" in message and "`width` option says 512" in message


def test_a_flag_that_agrees_with_an_option_is_fine_and_inherited_options_yield():
    [raw] = jobs("a fox --seed 7 --ar 3:2", RawOptions(prompt="", seed=7, width=624))
    assert (raw.seed, raw.width, raw.height) == (7, 624, 416)
    [raw] = jobs("a fox --steps 9", RawOptions(prompt="", steps=25), override=True)
    assert raw.steps == 9


# ---- --ar ------------------------------------------------------------------------------------


def test_aspect_keeps_about_the_default_pixel_count_in_multiples_of_8():
    assert aspect_size(3, 2, SD15) == (624, 416)
    assert aspect_size(2, 3, SD15) == (416, 624)
    assert aspect_size(16, 9, SD15) == (680, 384)
    assert aspect_size(1, 1, SD15) == (512, 512)
    for across, down in [(3, 2), (16, 9), (4, 1), (1, 3), (7, 5)]:
        width, height = aspect_size(across, down, SD15)
        assert width % 8 == 0 and height % 8 == 0
        assert 0.75 < width * height / (512 * 512) < 1.25
        assert abs(width / height - across / down) < 0.05 * across / down


def test_aspect_grows_or_shrinks_to_the_side_limits():
    assert aspect_size(3, 2, TEST_LIMITS) == (96, 64)  # 64×64 default, 64 the smallest side
    assert aspect_size(4, 1, SD15) == (1024, 256)
    message = refusal(aspect_size, 5, 1, SD15)
    assert message.startswith("`--ar`") and "between 1:4 and 4:1" in message


# ---- permutations and --repeat ---------------------------------------------------------------


def test_permutations_expand_to_one_prompt_per_variant():
    assert parse_prompt("a {red, blue} car", 4).prompts == ["a red car", "a blue car"]
    assert parse_prompt("{a,b} {c,d}", 4).prompts == ["a c", "a d", "b c", "b d"]
    assert parse_prompt(r"a \{literal\} {x}", 4).prompts == [r"a \{literal\} x"]


def test_repeat_counts_toward_the_same_limit_and_takes_the_next_seeds():
    raws = jobs("{red,blue} fox --seed 7 --repeat 2 --count 2")
    assert [(r.prompt, r.seed) for r in raws] == [
        ("red fox", 7),
        ("red fox", 9),
        ("blue fox", 7),
        ("blue fox", 9),
    ]
    assert [r.seed for r in jobs("fox --repeat 3")] == [None] * 3  # random seeds each


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{a,b,c} {d,e}", "makes 6 prompt(s); at most 4"),
        ("{a,b,c} --repeat 2", "makes 3 prompt(s) × --repeat 2"),
        ("{a,b}" * 40, "over a million prompts"),
        ("a {b, {c}}", "`{` at position 7 is inside a group"),
        ("a {b", "`{` at position 3 is never closed"),
        ("a b}", "`}` at position 4 closes no group"),
    ],
)
def test_bad_permutations_are_refused(text, expected):
    message = refusal(parse_prompt, text, 4)
    assert message.startswith("`prompt`") and expected in message


@pytest.mark.parametrize("repeat", ["0", "5"])
def test_repeat_out_of_range_is_refused(repeat):
    assert "from 1 to 4" in refusal(parse_prompt, f"a --repeat {repeat}", 4)


# ---- weights ---------------------------------------------------------------------------------


def test_weights_follow_automatic1111():
    [chunk] = parse_weights("a (fox:1.5) [cat] ((owl)) (dog) plain")
    weights = {f.text: round(f.weight, 4) for f in chunk}
    assert weights == {
        "a ": 1.0,
        "fox": 1.5,
        " ": 1.0,
        "cat": round(1 / 1.1, 4),
        "owl": 1.21,
        "dog": 1.1,
        " plain": 1.0,
    }


def test_nesting_multiplies_and_escapes_are_literal():
    [chunk] = parse_weights(r"((fox:1.5) hat:2) \(lit\) \[x\] \\")
    assert chunk[0] == Fragment("fox", 1.5 * 2)
    assert chunk[1] == Fragment(" hat", 2.0)
    assert chunk[2] == Fragment(r" (lit) [x] \ ".rstrip(), 1.0)


def test_a_colon_without_a_weight_is_text():
    assert parse_weights("time: 5pm, (ratio 1:2 wide)") == [
        [Fragment("time: 5pm, ", 1.0), Fragment("ratio 1:2 wide", 1.1)]
    ]
    # As in AUTOMATIC1111, a number after the colon right before `)` is a weight.
    assert parse_weights("(ratio 1:2)") == [[Fragment("ratio 1", 2.0)]]


def test_break_starts_a_new_chunk():
    chunks = parse_weights("a red fox BREAK (a blue sky:1.2) BREAK")
    assert chunks == [[Fragment("a red fox", 1.0)], [Fragment("a blue sky", 1.2)], []]
    assert parse_weights("BREAKFAST") == [[Fragment("BREAKFAST", 1.0)]]
    assert parse_weights("") == [[]]


def test_weighted_terms_for_the_dry_run():
    assert weighted_terms(parse_weights("a (fox:1.5) [cat] dog")) == ["fox ×1.5", "cat ×0.909"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a (fox", "`(` at position 3 is never closed by `)`"),
        ("a [fox", "`[` at position 3 is never closed by `]`"),
        ("a fox)", "`)` at position 6 closes no `(`"),
        ("a fox]", "`]` at position 6 closes no `[`"),
        ("(a fox]", "`]` at position 7 closes no `[`"),
        ("smile :)", "`)` at position 8 closes no `(`"),
        ("(fox:1.2.3)", "the weight '1.2.3' at position 5"),
        ("(fox:9)", f"from 0 to {MAX_WEIGHT:g}"),
        ("(fox:-1)", f"from 0 to {MAX_WEIGHT:g}"),
        ("(((fox:5)))", "weights multiply to 6.05 at position 4"),
        ("(" * 400 + "x" + ")" * 400, "weights multiply to"),
    ],
)
def test_weight_syntax_errors_point_at_the_position(text, expected):
    message = refusal(parse_weights, text, "negative_prompt")
    assert message.startswith("`negative_prompt`") and expected in message
    assert "literal" in message or "weight" in message


def test_garbage_prompts_end_in_a_prompt_or_a_refusal_quickly():
    """Hostile text built from the language's own symbols (flags, brackets, braces, colons,
    escapes, BREAK) at full length: every one parses or is refused with InvalidRequest, and
    no parse takes long, whatever nesting or flag soup it holds."""
    rng = random.Random(16)
    pieces = [*"()[]{},:\\- ", "--", "--ar ", "--no ", "--seed ", "--repeat ", "BREAK"]
    pieces += ["fox", "1.5", "9" * 30, "3:2", "é", "\x00"]
    slowest = 0.0
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 600)))[:MAX_PROMPT_CHARS]
        started = time.perf_counter()
        try:
            parsed = parse_prompt(text, 4)
            parsed.requests(RawOptions(prompt=text), SD15)
            parse_weights(parsed.text)
        except InvalidRequest:
            pass
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.5, f"one prompt took {slowest:.2f} s to parse"
