"""The FLUX family on the tiny random-weight `tiny-flux`, loaded through the real loading code:
its files, batching with a seed and a guidance scale per image, and what validation refuses
on a flow model (SD schedulers, weights and BREAK)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers/huggingface_hub read it

import argparse
import dataclasses
import json
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from factories import pixels
from PIL import Image

from bot.__main__ import generate
from bot.families import model_family
from bot.models import Catalog, ModelEntry
from bot.pipelines import PipelineOptions, PipelineRunner, load_pipeline
from bot.pipelines.flow import flow_strength
from bot.pipelines.per_image import strength_for
from bot.requests import BatchKey, ImageSpec, InvalidRequest, Limits, RawOptions, validate
from bot.service import check_family

SPECS = [
    ImageSpec("a red cat on a sofa", "", 11, guidance=3.5),
    ImageSpec("a dog", "ignored", 22, guidance=2.0),
    ImageSpec("mountains at dawn, oil painting", "", 33, guidance=5.0),
]


def key(**fields: object) -> BatchKey:
    values = {"model": "tiny-flux", "mode": "text", "width": 64, "height": 64, "steps": 2}
    return BatchKey(scheduler="Flow Euler", **{**values, **fields})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flux-models")


@pytest.fixture(scope="module")
def runner(cache: Path) -> Iterator[PipelineRunner]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runner = PipelineRunner(PipelineOptions(device="cpu", cache_dir=cache))
    runner.load("tiny-flux")
    yield runner
    torch.set_num_threads(threads)


def test_tiny_flux_is_built_as_a_flux_model_and_loads_back(
    runner: PipelineRunner, cache: Path
) -> None:
    index = json.loads((cache / "tiny-flux" / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["tokenizer_2"] == ["transformers", "T5Tokenizer"]
    assert model_family("tiny-flux", cache) == "flux"
    assert model_family(str(cache / "tiny-flux"), cache) == "flux"  # read from the folder
    pipe = load_pipeline("tiny-flux", PipelineOptions(device="cpu", cache_dir=cache))
    assert type(pipe) is FluxPipeline
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert pipe.transformer.config.guidance_embeds
    assert pipe.vae.config.latent_channels == 16 and pipe.vae.config.shift_factor


def test_flux_image_is_the_same_alone_and_in_a_batch(runner: PipelineRunner) -> None:
    batch = runner.generate(key(), SPECS)
    for spec, in_batch in zip(SPECS, batch, strict=True):
        (alone,) = runner.generate(key(), [spec])
        assert np.abs(pixels(alone) - pixels(in_batch)).max() <= 1, spec
        assert in_batch.image.size == (64, 64) and pixels(in_batch).std() > 1


def test_flux_guidance_and_seed_are_each_images_own(runner: PipelineRunner) -> None:
    spec = SPECS[0]
    more = ImageSpec(spec.prompt, "", spec.seed, guidance=9.0)
    other_seed = ImageSpec(spec.prompt, "", spec.seed + 1, guidance=spec.guidance)
    first, guided, reseeded = runner.generate(key(), [spec, more, other_seed])
    assert np.abs(pixels(first) - pixels(guided)).mean() > 0.5
    assert np.abs(pixels(first) - pixels(reseeded)).mean() > 5


def test_flux_reports_steps_with_previews(runner: PipelineRunner) -> None:
    seen: list[tuple[int, int, int]] = []
    runner.generate(
        key(steps=3),
        SPECS[:2],
        progress=lambda done, total, previews: seen.append((done, total, len(previews or []))),
        preview_every=1,
    )
    assert seen == [(1, 3, 2), (2, 3, 2), (3, 3, 0)]


def flux_catalog() -> Catalog:
    models = {
        "tiny": ModelEntry("tiny", "tiny", family="sd"),
        "flux": ModelEntry("flux", "tiny-flux", family="flux"),
    }
    return Catalog("tiny", models)


def test_a_flux_model_defaults_to_the_flow_scheduler_and_refuses_sd_ones() -> None:
    catalog = flux_catalog()
    assert validate(RawOptions("a fox", model="flux"), Limits(), catalog).scheduler == "Flow Euler"
    assert validate(RawOptions("a fox"), Limits(), catalog).scheduler == "DPM++ 2M"
    with pytest.raises(InvalidRequest) as refused:
        validate(RawOptions("a fox", model="flux", scheduler="Euler a"), Limits(), catalog)
    assert str(refused.value) == (
        "`scheduler`: Euler a does not apply to flux, a FLUX.1 model; it runs with: Flow Euler."
    )
    with pytest.raises(InvalidRequest, match="does not apply to tiny"):
        validate(RawOptions("a fox", scheduler="Flow Euler"), Limits(), catalog)
    assert "scheduler" in catalog.own_defaults("flux")


@pytest.mark.parametrize("prompt", ["a (red:1.3) fox", "a [red] fox", "a fox BREAK a hill"])
def test_weights_and_break_are_refused_on_flux_naming_the_model(prompt: str) -> None:
    catalog = flux_catalog()
    request = validate(RawOptions(prompt, model="flux"), Limits(), catalog)
    with pytest.raises(InvalidRequest, match=r"flux is a FLUX\.1 model, which takes no weights"):
        check_family(request, "flux")
    check_family(validate(RawOptions(prompt), Limits(), catalog), "sd")  # SD reads them
    plain = validate(RawOptions(r"a \(red\) fox", model="flux"), Limits(), catalog)
    check_family(plain, "flux")


def test_flux_image_mode_denoises_the_keys_steps_per_image(runner: PipelineRunner) -> None:
    (parent,) = runner.generate(key(), SPECS[:1])
    image_key = key(mode="image", steps=4, image_steps=2)
    specs = [replace(spec, init_image=parent.image) for spec in SPECS]
    seen: list[tuple[int, int]] = []
    batch = runner.generate(image_key, specs, progress=lambda d, t, _p: seen.append((d, t)))
    assert seen == [(1, 2), (2, 2)]  # the last 2 of 4 steps, as SD's image-to-image counts
    for spec, in_batch in zip(specs, batch, strict=True):
        (alone,) = runner.generate(image_key, [spec])
        assert np.abs(pixels(alone) - pixels(in_batch)).max() <= 1, spec
        assert in_batch.image.size == (64, 64)


@pytest.mark.parametrize(("steps", "image_steps"), [(4, 1), (10, 6), (22, 15), (7, 7)])
def test_flow_strength_gives_fluxs_image_to_image_the_keys_steps(
    steps: int, image_steps: int
) -> None:
    strength = flow_strength(steps, strength_for(steps, image_steps))
    # diffusers' FluxImg2ImgPipeline.get_timesteps: steps - int(steps - steps × strength)
    assert steps - int(max(steps - min(steps * strength, steps), 0)) == image_steps


def test_flux_inpaint_keeps_the_box_and_is_the_same_alone(runner: PipelineRunner) -> None:
    (parent,) = runner.generate(key(), SPECS[:1])
    canvas = Image.new("RGB", (96, 64))
    canvas.paste(parent.image, (16, 0))
    box = (16, 0, 80, 64)
    paint_key = key(mode="inpaint", width=96)
    specs = [replace(spec, init_image=canvas, keep_box=box) for spec in SPECS[:2]]
    batch = runner.generate(paint_key, specs)
    for spec, in_batch in zip(specs, batch, strict=True):
        (alone,) = runner.generate(paint_key, [spec])
        assert np.abs(pixels(alone) - pixels(in_batch)).max() <= 1, spec
        kept = pixels(in_batch)[16:-16, 32:64]  # inside the box, past the feather
        assert np.array_equal(kept, pixels(parent)[16:-16, 16:48])


def test_a_flux_size_off_its_16_pixel_grid_is_refused_naming_the_model() -> None:
    catalog = flux_catalog()
    # As Zoom Out ×1.5 makes of a 336-pixel parent: the size comes from the start picture.
    request = replace(validate(RawOptions("a fox", model="flux"), Limits(), catalog), width=264)
    with pytest.raises(InvalidRequest, match=r"`width`: must be a multiple of 16 on flux"):
        check_family(request, "flux")
    check_family(validate(RawOptions("a fox", width=264), Limits(), catalog), "sd")


@pytest.mark.parametrize("upload", [(1000, 600), (333, 777), (4000, 90)])
def test_an_upload_on_flux_is_drawn_on_its_16_pixel_grid(upload: tuple[int, int]) -> None:
    catalog = flux_catalog()
    raw = RawOptions("a fox", model="flux")
    request = validate(raw, Limits(), catalog, init_image=("h", 8, 8), upload_size=upload)
    assert request.width % 16 == 0 and request.height % 16 == 0
    check_family(request, "flux")
    with pytest.raises(InvalidRequest, match=r"multiple of 16 from 256 to 1024, got 520"):
        validate(RawOptions("a fox", model="flux", width=520), Limits(), catalog)


def test_without_a_guidance_embedding_guidance_changes_nothing(cache: Path) -> None:
    """FLUX.1 [schnell]'s transformer embeds no guidance: the scale is ignored, as in diffusers."""
    schnell = cache / "tiny-flux-schnell"
    if not schnell.exists():
        shutil.copytree(cache / "tiny-flux", schnell)
        config = schnell / "transformer" / "config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "guidance_embeds": False}))
    runner = PipelineRunner(PipelineOptions(device="cpu", cache_dir=cache))
    assert not runner.load(str(schnell)).transformer.config.guidance_embeds
    spec = SPECS[0]
    low, high = runner.generate(
        key(model=str(schnell)), [replace(spec, guidance=1.0), replace(spec, guidance=9.0)]
    )
    assert np.array_equal(pixels(low), pixels(high))


async def test_the_command_line_refuses_an_sd_scheduler_on_a_flux_model(settings, capsys) -> None:
    """`python -m bot generate` validates before the model loads: the family is read first."""
    args = argparse.Namespace(
        prompt="a fox",
        seed=1,
        negative_prompt=None,
        steps=2,
        guidance=None,
        width=None,
        height=None,
        scheduler="Euler",
        count=1,
        model=None,
        lora=None,
        out=None,
    )
    assert await generate(dataclasses.replace(settings, model_id="tiny-flux"), args) == 2
    assert "Euler does not apply to tiny-flux, a FLUX.1 model" in capsys.readouterr().err


def test_a_flux_prompt_is_counted_in_t5_tokens(runner: PipelineRunner, cache: Path) -> None:
    """The tiny T5 tokenizer reads every space as a token, the tiny CLIP one does not: 75
    words of one letter are 150 T5 tokens, two chunks of 75."""
    prompt = "a " * 75
    assert runner.prompt_chunks("tiny-flux", prompt) == 2
    fresh = PipelineRunner(PipelineOptions(device="cpu", cache_dir=cache))  # nothing loaded
    assert fresh.prompt_chunks("tiny-flux", prompt) == 2
    assert fresh.models.resident_models() == frozenset()
