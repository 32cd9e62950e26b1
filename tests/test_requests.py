import math
import random

import pytest

from bot.models import Catalog
from bot.requests import (
    DEFAULT_SCHEDULER,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    SCHEDULERS,
    InvalidRequest,
    Limits,
    RawOptions,
    validate,
)

LIMITS = Limits(max_steps=50, min_side=256, max_side=1024, max_count=4)
CATALOG = Catalog.single("model-x")


def check(**options):
    options.setdefault("prompt", "photo of a panda surfing")
    return validate(RawOptions(**options), LIMITS, CATALOG, random.Random(1))


def test_defaults_fill_every_parameter():
    request = check(seed=42)
    assert (request.seed, request.steps, request.guidance) == (42, 25, 7.5)
    assert (request.width, request.height, request.count) == (512, 512, 1)
    assert request.scheduler == DEFAULT_SCHEDULER
    assert request.model == "model-x"
    assert request.seeds == [42]


def test_count_uses_consecutive_seeds():
    assert check(seed=7, count=4).seeds == [7, 8, 9, 10]


def test_random_seed_leaves_room_for_the_count():
    request = check(count=4)
    assert 0 <= request.seed <= MAX_SEED - 3


@pytest.mark.parametrize(
    ("options", "option", "fragment"),
    [
        ({"prompt": "   "}, "prompt", "must not be empty"),
        ({"prompt": "\x00\x01"}, "prompt", "must not be empty"),
        ({"prompt": "x" * (MAX_PROMPT_CHARS + 1)}, "prompt", f"at most {MAX_PROMPT_CHARS}"),
        ({"steps": 0}, "steps", "from 1 to 50"),
        ({"steps": 51}, "steps", "from 1 to 50"),
        ({"steps": 2.5}, "steps", "whole number"),
        ({"steps": True}, "steps", "whole number"),
        ({"width": 500}, "width", "multiple of 8"),
        ({"height": 2048}, "height", "from 256 to 1024"),
        ({"width": 128}, "width", "from 256 to 1024"),
        ({"count": 5}, "count", "from 1 to 4"),
        ({"seed": -1}, "seed", "from 0"),
        ({"seed": MAX_SEED, "count": 2}, "seed", "from 0"),
        ({"guidance": math.nan}, "guidance", "a number from 0"),
        ({"guidance": 31}, "guidance", "a number from 0"),
        ({"guidance": "high"}, "guidance", "a number from 0"),
        ({"scheduler": "Karras++"}, "scheduler", "must be one of"),
        ({"negative_prompt": 12}, "negative_prompt", "must be text"),
    ],
)
def test_bad_options_name_the_option_and_the_range(options, option, fragment):
    with pytest.raises(InvalidRequest) as caught:
        check(**options)
    assert caught.value.option == option
    assert f"`{option}`" in str(caught.value)
    assert fragment in str(caught.value)


def test_every_scheduler_name_is_accepted():
    assert {check(scheduler=name).scheduler for name in SCHEDULERS} == set(SCHEDULERS)


def test_batch_key_ignores_what_varies_per_image():
    a = check(prompt="a cat", seed=1, negative_prompt="blur")
    b = check(prompt="a dog", seed=99, count=3)
    assert a.batch_key == b.batch_key
    assert check(width=256).batch_key != a.batch_key
    assert check(steps=20).batch_key != a.batch_key
    assert check(scheduler="Euler a").batch_key != a.batch_key
    # Guidance is per image; only skipping the unconditional pass (a scale of at most 1) is not.
    assert check(guidance=5).batch_key == check(guidance=12).batch_key == a.batch_key
    assert check(guidance=1).batch_key == check(guidance=0).batch_key != a.batch_key
    assert check(guidance=1.01).batch_key == a.batch_key


def test_img2img_key_holds_the_steps_the_strength_leaves_not_the_strength():
    def image(strength, steps=10):
        raw = RawOptions("a cat", steps=steps, strength=strength)
        return validate(raw, LIMITS, CATALOG, init_image=("h", 64, 64)).batch_key

    assert image(0.3) == image(0.39) and image(0.3).image_steps == 3
    assert image(0.3) != image(0.4) and image(0.4).denoising_steps == 4
    assert image(0.69, 22) == image(0.72, 22) and image(0.72, 22).image_steps == 15
    assert check(steps=10).batch_key.image_steps is None
    assert check(steps=10).batch_key.denoising_steps == 10


def test_control_characters_are_stripped_from_prompts():
    assert check(prompt="a\x00 cat\u200f").prompt == "a cat"
