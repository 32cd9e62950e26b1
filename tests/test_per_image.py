"""A guidance scale per image inside one diffusers call, on the tiny model: jobs that differ
only in guidance share a key and a call, and each image keeps the pixels it gets alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from factories import make_job, make_request, pixels

from bot.pipelines import PipelineRunner, with_scheduler
from bot.pipelines.per_image import GuidedText2Image
from bot.requests import SCHEDULERS, BatchKey, ImageSpec

KEY = BatchKey("tiny", "text", 64, 64, steps=4, scheduler="DPM++ 2M")
MIXED = [
    ImageSpec("a red cat on a sofa", "", 11, guidance=3.0),
    ImageSpec("a dog", "blurry", 22, guidance=7.5),
    ImageSpec("mountains at dawn, oil painting", "people", 33, guidance=12.0),
]


def plain_call(pipe: StableDiffusionPipeline, spec: ImageSpec, steps: int = 4) -> Any:
    """The image diffusers' own pipeline makes for this spec alone, at its own scale."""
    (image,) = pipe(
        prompt=spec.prompt,
        negative_prompt=spec.negative_prompt,
        generator=torch.Generator().manual_seed(spec.seed),
        guidance_scale=spec.guidance,
        num_inference_steps=steps,
        width=64,
        height=64,
    ).images
    return np.asarray(image, dtype=np.int16)


def unet_batches(pipe: StableDiffusionPipeline) -> tuple[list[int], Any]:
    """The batch size of each UNet forward, recorded by a hook (remove it when done)."""
    seen: list[int] = []
    hook = pipe.unet.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
    return seen, hook


def test_jobs_that_differ_only_in_guidance_share_a_key_and_one_call(
    tiny_runner: PipelineRunner,
) -> None:
    tiny = {"model": "tiny", "width": 64, "height": 64, "steps": 4, "prompt": "a cat"}
    jobs = [
        make_job(i, make_request(guidance=g, seed=i, **tiny)) for i, g in enumerate((3, 7.5, 12))
    ]
    keys = {job.request.batch_key for job in jobs}
    assert len(keys) == 1 and keys.pop().cfg
    specs = [spec for job in jobs for spec in job.image_specs]
    assert [spec.guidance for spec in specs] == [3, 7.5, 12]
    seen, hook = unet_batches(tiny_runner.load("tiny"))
    try:
        batch = tiny_runner.generate(jobs[0].request.batch_key, specs)
    finally:
        hook.remove()
    # One call: every step ran all three images, each with and without its prompt.
    assert seen == [6] * jobs[0].request.steps
    for job, result in zip(jobs, batch, strict=True):
        (alone,) = tiny_runner.generate(job.request.batch_key, job.image_specs)
        assert np.abs(pixels(alone) - pixels(result)).max() <= 1
    # Without classifier-free guidance (a scale of at most 1) the call costs half: its own key.
    unguided = make_request(guidance=1.0).batch_key
    assert unguided.cfg is False and unguided != jobs[0].request.batch_key
    assert make_request(guidance=0.0).batch_key == unguided


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_a_batch_mixing_guidance_gives_each_image_its_alone_pixels(
    tiny_runner: PipelineRunner, scheduler: str
) -> None:
    key = replace(KEY, scheduler=scheduler)
    batch = tiny_runner.generate(key, MIXED)
    for spec, in_batch in zip(MIXED, batch, strict=True):
        (alone,) = tiny_runner.generate(key, [spec])
        assert np.abs(pixels(alone) - pixels(in_batch)).max() <= 1, spec


@pytest.mark.parametrize("scheduler", ["DPM++ 2M", "Euler a"])
def test_each_scale_is_the_one_diffusers_applies_for_it_alone(
    tiny_runner: PipelineRunner, scheduler: str
) -> None:
    batch = tiny_runner.generate(replace(KEY, scheduler=scheduler), MIXED)
    for spec, result in zip(MIXED, batch, strict=True):
        pipe = with_scheduler(tiny_runner.load("tiny"), scheduler)
        assert np.abs(plain_call(pipe, spec) - pixels(result)).max() <= 1, spec


def test_the_scale_per_image_really_changes_the_image(tiny_runner: PipelineRunner) -> None:
    low, high = ImageSpec("a red cat", "blurry", 5, 3.0), ImageSpec("a red cat", "blurry", 5, 12.0)
    first, second = tiny_runner.generate(KEY, [low, high])
    assert np.abs(pixels(first) - pixels(second)).mean() > 2


def test_scales_of_at_most_one_skip_the_unconditional_pass(tiny_runner: PipelineRunner) -> None:
    key = replace(KEY, cfg=False)
    specs = [ImageSpec("a dog", "blurry", 22, guidance=1.0), ImageSpec("a cat", "", 7, 0.0)]
    seen, hook = unet_batches(tiny_runner.load("tiny"))
    try:
        batch = tiny_runner.generate(key, specs)
    finally:
        hook.remove()
    assert seen == [2] * KEY.steps  # one sample per image, not two
    pipe = with_scheduler(tiny_runner.load("tiny"), KEY.scheduler)
    for spec, result in zip(specs, batch, strict=True):
        assert np.abs(plain_call(pipe, spec) - pixels(result)).max() <= 1, spec


def test_a_scale_on_the_wrong_side_of_one_fails_the_batch(tiny_runner: PipelineRunner) -> None:
    with pytest.raises(ValueError, match="cfg=True"):
        tiny_runner.generate(KEY, [MIXED[0], replace(MIXED[1], guidance=1.0)])
    with pytest.raises(ValueError, match="cfg=False"):
        tiny_runner.generate(replace(KEY, cfg=False), MIXED[:1])


def test_a_guidance_embedding_unet_takes_each_image_its_own_scale(
    tiny_runner: PipelineRunner,
) -> None:
    """LCM-style UNets take the scale as an embedding instead of a second pass; compared in
    latents, since the tiny UNet's random embedding moves few pixels."""
    base = tiny_runner.load("tiny")
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({**base.unet.config, "time_cond_proj_dim": 8})
    lcm = StableDiffusionPipeline(
        **{**base.components, "unet": unet.eval()}, requires_safety_checker=False
    )

    def call(run: Callable[..., Any], specs: list[ImageSpec], **kw: Any) -> torch.Tensor:
        return run(
            prompt=[spec.prompt for spec in specs],
            negative_prompt=[spec.negative_prompt for spec in specs],
            generator=[torch.Generator().manual_seed(spec.seed) for spec in specs],
            num_inference_steps=4,
            width=64,
            height=64,
            output_type="latent",
            **kw,
        ).images

    guided = with_scheduler(lcm, "Euler", GuidedText2Image)
    seen, hook = unet_batches(lcm)
    try:
        batch = call(partial(guided.guided_call, [spec.guidance for spec in MIXED], True), MIXED)
    finally:
        hook.remove()
    assert seen == [3] * 4  # no unconditional pass, as in diffusers
    for i, spec in enumerate(MIXED):
        alone = call(with_scheduler(lcm, "Euler"), [spec], guidance_scale=spec.guidance)
        assert (alone[0] - batch[i]).abs().max() < 1e-4, spec
    low = call(with_scheduler(lcm, "Euler"), [MIXED[2]], guidance_scale=3.0)
    assert (low[0] - batch[2]).abs().max() > 1e-2
