"""Models and LoRAs on the device: the built-in tiny SDXL model and tiny LoRA, LoRA weights,
the seed promise with LoRAs and with SDXL, and residency within a memory budget."""

from __future__ import annotations

import json
import os
import weakref
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from factories import pixels

from bot.downloads import BUILTIN_SOURCES
from bot.models import Catalog, LoraEntry, ModelEntry
from bot.pipelines import (
    ModelNotAvailable,
    PipelineOptions,
    PipelineRunner,
    load_pipeline,
    with_scheduler,
)
from bot.pipelines.devices import memory_budget, module_bytes
from bot.pipelines.loading import weights_bytes
from bot.pipelines.tiny import BUILT_IN_LORAS, BUILT_IN_MODELS
from bot.requests import BatchKey, ImageSpec

# Names members see, sources the runner loads: the allowlist's two columns.
CATALOG = Catalog(
    default="small",
    models={"small": ModelEntry("small", "tiny"), "xl": ModelEntry("xl", "tiny-sdxl")},
    loras={"pixel": LoraEntry("pixel", "tiny-lora", ("small",))},
)
SPECS = [
    ImageSpec("a red cat on a sofa", "", 11, guidance=3.0),
    ImageSpec("a dog", "blurry", 22, guidance=7.5),
    ImageSpec("mountains at dawn, oil painting", "people", 33, guidance=12.0),
]


def key(model: str = "small", **changes: object) -> BatchKey:
    # "Euler a" draws noise from each image's generator at every step: a stricter seed test.
    values: dict = {"width": 64, "height": 64, "steps": 3, "scheduler": "Euler a"} | changes
    mode = "image" if values.get("image_steps") else "text"
    return BatchKey(model, mode, **values)  # type: ignore[arg-type]


def assert_same_image(one: np.ndarray, other: np.ndarray) -> None:
    """Equal up to one level: a batch's float sums round differently (tests/test_pipelines.py)."""
    assert np.abs(one - other).max() <= 1


def images(runner: PipelineRunner, batch_key: BatchKey, specs: list[ImageSpec]) -> list:
    return [pixels(result) for result in runner.generate(batch_key, specs)]


@pytest.fixture(scope="module")
def runner(model_cache: Path) -> Iterator[PipelineRunner]:
    """Its own runner: LoRAs loaded here must not reach the session's shared tiny model."""
    torch.set_num_threads(1)  # as the session's runner: two cores are shared with the tests
    yield PipelineRunner(PipelineOptions(device="cpu", cache_dir=model_cache), CATALOG)


def test_a_lora_changes_the_pixels_and_its_weight_zero_does_not(runner: PipelineRunner) -> None:
    spec = [SPECS[0]]
    plain = images(runner, key(), spec)[0]
    with_lora = images(runner, key(loras=(("pixel", 1.0),)), spec)[0]
    stronger = images(runner, key(loras=(("pixel", 2.0),)), spec)[0]
    at_zero = images(runner, key(loras=(("pixel", 0.0),)), spec)[0]
    assert np.abs(with_lora - plain).mean() > 2  # visibly: a few levels per pixel on average
    assert np.abs(stronger - plain).mean() > np.abs(with_lora - plain).mean()
    assert np.array_equal(at_zero, plain)
    # The adapter stays loaded, and a call without LoRAs is the model's own again.
    assert np.array_equal(images(runner, key(), spec)[0], plain)


def test_same_seed_model_and_lora_give_the_same_pixels_alone_and_batched(
    runner: PipelineRunner,
) -> None:
    lora = key(loras=(("pixel", 0.8),))
    alone = [images(runner, lora, [spec])[0] for spec in SPECS]
    batched = images(runner, lora, [SPECS[2], SPECS[0], SPECS[1]])
    for index, image in zip((2, 0, 1), batched, strict=True):
        assert_same_image(image, alone[index])


def test_tiny_sdxl_loads_as_sdxl_with_both_text_encoders(runner: PipelineRunner) -> None:
    pipe = runner.load("xl")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.text_encoder is not None and pipe.text_encoder_2.config.projection_dim == 32
    arguments = runner.models.load("xl").encoder.arguments(["a cat"], [""])
    assert arguments["pooled_prompt_embeds"].shape == (1, 32)
    # SDXL zeroes an empty negative prompt, pooled embedding included, as diffusers does.
    assert not arguments["negative_pooled_prompt_embeds"].any()


@pytest.mark.parametrize("negative", ["", "blurry"])
def test_tiny_sdxl_gives_what_diffusers_own_sdxl_pipeline_gives(
    runner: PipelineRunner, negative: str
) -> None:
    """Our prompt encoding (both encoders, pooled embeddings, zeros for an empty negative
    prompt) and decoding against diffusers' own call from the prompt text."""
    spec = ImageSpec("a red cat", negative, 11, guidance=6.0)
    ours = images(runner, key("xl", scheduler="Euler"), [spec])[0]
    pipe = with_scheduler(runner.load("xl"), "Euler", StableDiffusionXLPipeline)
    (theirs,) = pipe(
        prompt=spec.prompt,
        negative_prompt=negative or None,  # None: diffusers' zeros, as for SDXL's empty prompt
        generator=torch.Generator().manual_seed(spec.seed),
        guidance_scale=spec.guidance,
        num_inference_steps=3,
        width=64,
        height=64,
    ).images
    assert np.array_equal(ours, pixels(theirs))


@pytest.mark.parametrize("mode", ["text", "image"])
def test_tiny_sdxl_per_image_guidance_gives_the_same_pixels_alone_and_batched(
    runner: PipelineRunner, mode: str
) -> None:
    specs = SPECS
    batch_key = key("xl")
    if mode == "image":
        start = runner.generate(key("xl"), [SPECS[1]])[0].image
        specs = [ImageSpec(s.prompt, s.negative_prompt, s.seed, s.guidance, start) for s in SPECS]
        batch_key = key("xl", steps=4, image_steps=2)
    alone = [images(runner, batch_key, [spec])[0] for spec in specs]
    batched = images(runner, batch_key, specs)
    for one, many in zip(alone, batched, strict=True):
        assert_same_image(one, many)
    assert np.abs(alone[0] - alone[1]).mean() > 5


def test_an_lcm_model_loads_by_its_class_name_and_runs_with_the_lcm_scheduler(
    runner: PipelineRunner, tmp_path: Path
) -> None:
    """An LCM model is SD 1.x with a guidance embedding in its UNet, saved as diffusers'
    LatentConsistencyModelPipeline: it loads as SD and guides each image by its own scale."""
    tiny = runner.load("small")
    unet = UNet2DConditionModel.from_config({**tiny.unet.config, "time_cond_proj_dim": 8})
    components = {k: v for k, v in tiny.components.items() if k != "unet"}
    scheduler = LCMScheduler.from_config(tiny.scheduler.config)
    LatentConsistencyModelPipeline(
        **{**components, "unet": unet, "scheduler": scheduler}, requires_safety_checker=False
    ).save_pretrained(tmp_path / "lcm")
    lcm = PipelineRunner(PipelineOptions(device="cpu", cache_dir=tmp_path))
    source = str(tmp_path / "lcm")
    assert type(lcm.load(source)) is StableDiffusionPipeline
    scales = (1.5, 4.0, 8.0)
    specs = [replace(spec, guidance=scale) for spec, scale in zip(SPECS, scales, strict=True)]
    lcm_key = key(source, scheduler="LCM", steps=2)
    alone = [images(lcm, lcm_key, [spec])[0] for spec in specs]
    for one, many in zip(alone, images(lcm, lcm_key, specs), strict=True):
        assert_same_image(one, many)


def test_two_models_over_the_budget_alternate_each_unloading_the_other(
    model_cache: Path,
) -> None:
    options = PipelineOptions(device="cpu", cache_dir=model_cache)
    sizes = {name: weights_bytes(name, options) for name in ("tiny", "tiny-sdxl")}
    # Room for the larger model alone, not for both: the CPU stands in for a small GPU.
    budget = max(sizes.values()) * 5 // 4
    assert budget < sum(sizes.values())
    runner = PipelineRunner(
        PipelineOptions(device="cpu", cache_dir=model_cache, memory_budget_bytes=budget), CATALOG
    )
    previous: weakref.ref | None = None
    for model in ("small", "xl", "small"):
        (image,) = runner.generate(key(model, steps=2), [SPECS[0]])
        assert image.image.size == (64, 64)
        assert runner.resident_models() == {model}
        unet = runner.load(model).unet
        if previous is not None:  # the runner dropped it and collected its reference cycles
            assert previous() is None, "the unloaded model's weights are still referenced"
        previous = weakref.ref(unet)
        del unet


def test_weights_are_estimated_before_loading(runner: PipelineRunner, model_cache: Path) -> None:
    options = PipelineOptions(device="cpu", cache_dir=model_cache)
    for source, name in (("tiny", "small"), ("tiny-sdxl", "xl")):
        loaded = module_bytes(runner.load(name).components.values())
        assert weights_bytes(source, options) == pytest.approx(loaded, rel=0.02)
    half = PipelineOptions(device="cpu", dtype="float16", cache_dir=model_cache)
    assert weights_bytes("tiny", half) == weights_bytes("tiny", options) // 2


def test_counting_prompt_chunks_loads_no_model(model_cache: Path) -> None:
    fresh = PipelineRunner(PipelineOptions(device="cpu", cache_dir=model_cache), CATALOG)
    assert fresh.prompt_chunks("xl", "a cat BREAK a dog") == 2
    assert fresh.resident_models() == frozenset()


def test_memory_budget_from_the_device_when_not_set(model_cache: Path) -> None:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < memory_budget(torch.device("cpu")) < ram
    unset = PipelineRunner(PipelineOptions(device="cpu", cache_dir=model_cache))
    assert unset.models.budget == memory_budget(torch.device("cpu"))


def test_the_downloader_knows_every_built_in_source() -> None:
    assert set(BUILT_IN_MODELS) | set(BUILT_IN_LORAS) == BUILTIN_SOURCES


def test_a_pipeline_class_the_bot_does_not_run_is_refused_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "audio"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDMPipeline"}))
    with pytest.raises(ModelNotAvailable, match=r"AudioLDMPipeline.*StableDiffusionXLPipeline"):
        load_pipeline(str(folder), PipelineOptions(device="cpu", cache_dir=tmp_path))
