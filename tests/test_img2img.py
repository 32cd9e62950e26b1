"""Image-to-image on the tiny model: sizes, seeds as a promise, strength, and shared weights."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from factories import pixels
from PIL import Image

from bot.pipelines import PipelineOptions, PipelineRunner, with_scheduler
from bot.pipelines.per_image import strength_for
from bot.requests import SCHEDULERS, BatchKey, ImageSpec, denoising_steps


@pytest.fixture(scope="module")
def runner(model_cache: Path) -> Iterator[PipelineRunner]:
    """A runner of the tiny model on one thread: on a busy 2-core machine OpenMP threads spinning
    against another process turned 0.15 s calls into 14 s ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runner = PipelineRunner(PipelineOptions(device="cpu", cache_dir=model_cache))
    runner.load("tiny")
    yield runner
    torch.set_num_threads(threads)


# The random tiny VAE hands the unet weak init latents: a low strength lets the init show.
def key(strength: float = 0.3, width: int = 64, height: int = 64, **kw: object) -> BatchKey:
    """The key of a request at this strength: it keeps only the steps the strength leaves."""
    fields = {"model": "tiny", "scheduler": "DPM++ 2M", "steps": 10, **kw}
    image_steps = denoising_steps(fields["steps"], strength)  # type: ignore[arg-type]
    return BatchKey(mode="image", width=width, height=height, image_steps=image_steps, **fields)  # type: ignore[arg-type]


def init(seed: int, width: int = 64, height: int = 64) -> Image.Image:
    """A smooth colour gradient with some noise: something a VAE can encode and we can tell."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = rng.uniform(0, 255, 3) * (xs[..., None] / width) + rng.uniform(0, 128, 3)
    pixels = base + rng.normal(0, 10, (height, width, 3)) + 0 * ys[..., None]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def spec(seed: int, prompt: str = "a red cat", image_seed: int = 0, **size: int) -> ImageSpec:
    return ImageSpec(prompt, "blurry", seed, init_image=init(image_seed, **size))


def plain(seed: int, colour: str) -> ImageSpec:
    return ImageSpec("a red cat", "blurry", seed, init_image=Image.new("RGB", (64, 64), colour))


@pytest.mark.parametrize(("width", "height"), [(64, 64), (64, 128), (128, 64)])
def test_images_have_the_key_size_and_differ_from_the_init(
    runner: PipelineRunner, width: int, height: int
) -> None:
    specs = [spec(1, width=width, height=height), spec(2, image_seed=5, width=width, height=height)]
    results = runner.generate(key(width=width, height=height), specs)
    assert [r.image.size for r in results] == [(width, height)] * 2
    assert all(r.image.mode == "RGB" and r.error is None and not r.withheld for r in results)
    for s, r in zip(specs, results, strict=True):
        assert np.abs(pixels(r) - pixels(s.init_image)).mean() > 5


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_image_is_the_same_alone_and_in_a_batch(runner: PipelineRunner, scheduler: str) -> None:
    mine = spec(42, "a lighthouse at night", image_seed=1)
    others = [plain(7, "white"), ImageSpec("x", "", 99, init_image=init(3))]
    (alone,) = runner.generate(key(scheduler=scheduler), [mine])
    batch = runner.generate(key(scheduler=scheduler), [others[0], mine, others[1]])
    assert np.abs(pixels(alone) - pixels(batch[1])).max() <= 1
    # The batch's other members are really different images, not copies of mine.
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).mean() > 5
    (again,) = runner.generate(key(scheduler=scheduler), [mine])
    assert np.array_equal(pixels(alone), pixels(again))


def test_seed_init_image_and_strength_each_change_the_result(runner: PipelineRunner) -> None:
    (base,) = runner.generate(key(), [plain(1, "black")])
    (other_seed,) = runner.generate(key(), [plain(2, "black")])
    (other_init,) = runner.generate(key(), [plain(1, "white")])
    (stronger,) = runner.generate(key(0.6), [plain(1, "black")])
    for changed in (other_seed, other_init, stronger):
        assert np.abs(pixels(base) - pixels(changed)).mean() > 2


def test_strength_decides_the_number_of_steps(runner: PipelineRunner) -> None:
    seen: list[tuple[int, int]] = []
    weak = key(0.35, scheduler="Euler", steps=10)
    runner.generate(
        weak, [spec(1)], progress=lambda done, total, _previews: seen.append((done, total))
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]  # int(10 × 0.35) steps
    assert weak.denoising_steps == 3  # what the ETA and the speed records count


def test_img2img_shares_the_text_to_image_weights(runner: PipelineRunner) -> None:
    base = runner.load("tiny")
    call = with_scheduler(base, "Euler", StableDiffusionImg2ImgPipeline)
    assert isinstance(call, StableDiffusionImg2ImgPipeline)
    assert call.unet is base.unet and call.vae is base.vae
    assert call.text_encoder is base.text_encoder and call.tokenizer is base.tokenizer
    pointers = [p.data_ptr() for p in base.unet.parameters()]
    calls: list[int] = []
    hook = base.unet.register_forward_hook(lambda *_: calls.append(1))
    try:
        runner.generate(key(), [spec(1)])
    finally:
        hook.remove()
    assert calls  # the loaded unet itself ran, not a copy
    assert [p.data_ptr() for p in base.unet.parameters()] == pointers
    assert base.unet.dtype == base.vae.dtype == torch.float32
    assert type(base.scheduler).__name__ == "PNDMScheduler"


def test_bad_img2img_batches_fail_with_a_reason(runner: PipelineRunner) -> None:
    with pytest.raises(ValueError, match="init image"):
        runner.generate(key(), [ImageSpec("a cat", "", 1)])
    with pytest.raises(ValueError, match=r"init image of \(64, 64\)"):
        runner.generate(key(), [spec(1, width=128, height=64)])
    with pytest.raises(ValueError, match="steps to denoise from the init image"):
        runner.generate(replace(key(), image_steps=None), [spec(1)])
    with pytest.raises(ValueError, match="from 1 to 10 steps from the init image, got 11"):
        runner.generate(replace(key(), image_steps=11), [spec(1)])
    with pytest.raises(ValueError, match="from 1 to 5 steps from the init image, got 0"):
        runner.generate(key(0.1, steps=5), [spec(1)])  # int(5 × 0.1): no step to run


def test_the_call_strength_denoises_exactly_the_key_steps() -> None:
    """diffusers' img2img reads the strength only as min(int(steps × strength), steps), the
    steps it denoises; the runner passes `strength_for`, which gives back the key's count for
    every step count a server may allow and every strength a member may give (hundredths)."""
    for steps in range(1, 151):
        for hundredths in range(5, 101):
            image_steps = denoising_steps(steps, hundredths / 100)
            if image_steps >= 1:
                strength = strength_for(steps, image_steps)
                assert min(int(steps * strength), steps) == image_steps, (steps, hundredths)
    with pytest.raises(ValueError, match="from 1 to 4 steps"):
        strength_for(4, 5)


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_strengths_that_start_at_the_same_step_share_a_call_exactly(
    runner: PipelineRunner, scheduler: str
) -> None:
    """0.3 and 0.39 of 10 steps both denoise the last 3: one key, and in one call each image
    has the pixels a plain diffusers call at its own strength gives it."""
    assert key(0.3, scheduler=scheduler) == key(0.39, scheduler=scheduler)
    mine, other = spec(42, "a lighthouse at night", image_seed=1), spec(7, "a barn", image_seed=2)
    batch = runner.generate(key(0.39, scheduler=scheduler), [mine, other])
    for member, strength, result in ((mine, 0.3, batch[0]), (other, 0.39, batch[1])):
        pipe = with_scheduler(runner.load("tiny"), scheduler, StableDiffusionImg2ImgPipeline)
        (alone,) = pipe(
            prompt=member.prompt,
            negative_prompt=member.negative_prompt,
            image=member.init_image,
            strength=strength,
            num_inference_steps=10,
            guidance_scale=7.5,
            generator=torch.Generator().manual_seed(member.seed),
        ).images
        assert np.abs(np.asarray(alone, dtype=np.int16) - pixels(result)).max() <= 1
    assert np.abs(pixels(batch[0]) - pixels(batch[1])).mean() > 5
