"""Pipeline tests on the tiny random-weight model, loaded through the real loading code."""

from __future__ import annotations

import os
import warnings

# Before diffusers/huggingface_hub are imported: they read it once, at import time.
os.environ["HF_HUB_OFFLINE"] = "1"

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from factories import pixels
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from bot.pipelines import (
    ModelNotAvailable,
    PipelineOptions,
    PipelineRunner,
    build_tiny_model,
    load_pipeline,
    make_scheduler,
    resolve_device,
    with_scheduler,
)
from bot.requests import SCHEDULERS, BatchKey, ImageSpec
from bot.results import BLANK_IMAGE_ERROR, Interrupted

SPECS = [
    ImageSpec("a red cat on a sofa", "", 11),
    ImageSpec("a dog", "blurry", 22),
    ImageSpec("mountains at dawn, oil painting", "people", 33),
    ImageSpec("x", "y", 44),
]


def key(scheduler: str = "DPM++ 2M", width: int = 64, height: int = 64, **kw: object) -> BatchKey:
    fields = {"model": "tiny", "mode": "text", "steps": 4, **kw}
    return BatchKey(width=width, height=height, scheduler=scheduler, **fields)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("models")
    build_tiny_model(folder / "tiny-sd")
    return folder


@pytest.fixture(scope="session")
def runner(models_dir: Path) -> Iterator[PipelineRunner]:
    # One thread: the tiny model gains nothing from more, and on a shared 2-core machine
    # OpenMP threads spinning against another process made single tests take 20 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    runner = PipelineRunner(PipelineOptions(device="cpu", cache_dir=models_dir))
    runner.load("tiny")
    yield runner
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def flagging_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose safety checker flags every image: thresholds far below any cosine."""
    folder = build_tiny_model(tmp_path_factory.mktemp("sc") / "tiny-sc", with_safety_checker=True)
    weights = folder / "safety_checker" / "model.safetensors"
    tensors = load_file(weights)
    tensors["concept_embeds_weights"] = torch.full_like(tensors["concept_embeds_weights"], -10.0)
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def test_tiny_model_is_saved_and_loads_back(models_dir: Path, runner: PipelineRunner) -> None:
    folder = models_dir / "tiny-sd"
    assert (folder / "model_index.json").is_file()
    for part in ("unet", "vae", "text_encoder"):
        assert list((folder / part).glob("*.safetensors")), part
    pipe = runner.load("tiny")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert isinstance(pipe.text_encoder, CLIPTextModel)
    assert isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.scheduler, PNDMScheduler)
    assert pipe.safety_checker is None
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    assert runner.load("tiny") is pipe  # cached, not loaded twice
    # The saved tokenizer loads back and encodes any text without merges or downloads.
    ids = pipe.tokenizer("héllo!").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id


def test_build_is_idempotent_and_refuses_a_mismatch(models_dir: Path) -> None:
    folder = models_dir / "tiny-sd"
    stamp = (folder / "unet" / "config.json").stat().st_mtime_ns
    assert build_tiny_model(folder) == folder
    assert (folder / "unet" / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        build_tiny_model(folder, with_safety_checker=True)


def test_built_weights_are_deterministic(tmp_path: Path, models_dir: Path) -> None:
    again = build_tiny_model(tmp_path / "again")
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        first, second = load_file(models_dir / "tiny-sd" / name), load_file(again / name)
        assert all(torch.equal(first[k], second[k]) for k in first)


def test_missing_folder_raises_model_not_available(tmp_path: Path) -> None:
    options = PipelineOptions(device="cpu", cache_dir=tmp_path)
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelNotAvailable, match="no-such-model"):
        load_pipeline(missing, options)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailable, match=r"model_index\.json"):
        load_pipeline(str(tmp_path / "empty"), options)


def test_missing_hub_id_offline_raises_model_not_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    options = PipelineOptions(device="cpu", cache_dir=tmp_path)
    with pytest.raises(ModelNotAvailable) as caught:
        load_pipeline("nobody-here/no-such-model", options)
    message = str(caught.value)
    assert "nobody-here/no-such-model" in message
    assert "python -m bot download nobody-here/no-such-model" in message
    assert "HF_HUB_OFFLINE" in message


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_image_is_the_same_alone_and_in_a_batch(runner: PipelineRunner, scheduler: str) -> None:
    batch = runner.generate(key(scheduler), SPECS)
    for spec, in_batch in zip(SPECS, batch, strict=True):
        (alone,) = runner.generate(key(scheduler), [spec])
        assert np.abs(pixels(alone) - pixels(in_batch)).max() <= 1, spec


def test_seeds_decide_the_image(runner: PipelineRunner) -> None:
    spec = SPECS[0]
    other_seed = ImageSpec(spec.prompt, spec.negative_prompt, spec.seed + 1)
    first, same, other = runner.generate(key("Euler a"), [spec, spec, other_seed])
    assert np.abs(pixels(first) - pixels(same)).max() <= 1
    assert np.abs(pixels(first) - pixels(other)).mean() > 5
    again = runner.generate(key("Euler a"), [spec, spec, other_seed])
    assert all(
        np.array_equal(pixels(a), pixels(b))
        for a, b in zip([first, same, other], again, strict=True)
    )


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize(("width", "height"), [(64, 64), (64, 128)])
def test_every_scheduler_gives_images_of_the_asked_size(
    runner: PipelineRunner, scheduler: str, width: int, height: int
) -> None:
    results = runner.generate(key(scheduler, width, height, steps=3), SPECS[:2])
    assert [r.image.size for r in results] == [(width, height)] * 2
    assert not any(r.withheld for r in results)
    assert all(np.asarray(r.image).std() > 1 for r in results)  # not blank or NaN-black


def test_scheduler_swap_shares_weights_and_leaves_the_model_alone(runner: PipelineRunner) -> None:
    base = runner.load("tiny")
    call = with_scheduler(base, "Euler a")
    assert isinstance(call.scheduler, EulerAncestralDiscreteScheduler)
    assert call.unet is base.unet and call.vae is base.vae
    assert call.text_encoder is base.text_encoder
    runner.generate(key("UniPC"), SPECS[:1])
    assert isinstance(base.scheduler, PNDMScheduler)


def test_make_scheduler_uses_the_model_config(runner: PipelineRunner) -> None:
    config = runner.load("tiny").scheduler.config
    dpm = make_scheduler("DPM++ 2M", config)
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert dpm.config.beta_schedule == "scaled_linear" and dpm.config.beta_end == 0.012
    assert make_scheduler("DDIM", config).config.clip_sample is False
    assert make_scheduler("PNDM", config).config.skip_prk_steps is True
    assert make_scheduler("Euler", config) is not make_scheduler("Euler", config)
    with pytest.raises(ValueError, match="DPM\\+\\+ 2M"):
        make_scheduler("Heun", config)


def test_safety_checker_withholds_flagged_images(flagging_model: Path, models_dir: Path) -> None:
    checked = PipelineRunner(PipelineOptions(device="cpu", cache_dir=models_dir))
    model = str(flagging_model)
    assert isinstance(checked.load(model).safety_checker, StableDiffusionSafetyChecker)
    results = checked.generate(key(model=model), SPECS[:3])
    assert len(results) == 3 and all(r.withheld for r in results)
    assert all(np.asarray(r.image).max() == 0 for r in results)  # blacked out as well

    unchecked = PipelineRunner(
        PipelineOptions(device="cpu", cache_dir=models_dir, safety_checker=False)
    )
    assert unchecked.load(model).safety_checker is None
    results = unchecked.generate(key(model=model), SPECS[:3])
    assert not any(r.withheld for r in results)


def test_with_keep_flagged_flagged_images_keep_their_pixels_and_their_flag(
    flagging_model: Path, models_dir: Path
) -> None:
    """NSFW_CHANNELS=allow: delivery decides (a spoiler in an age-restricted channel, withheld
    elsewhere), so the runner hands over the very pixels an unchecked call draws, still
    flagged; by default they never leave the device."""
    model, specs = str(flagging_model), SPECS[:2]
    kept = PipelineRunner(PipelineOptions(device="cpu", cache_dir=models_dir, keep_flagged=True))
    results = kept.generate(key(model=model), specs)
    assert all(r.withheld for r in results)
    unchecked = PipelineRunner(
        PipelineOptions(device="cpu", cache_dir=models_dir, safety_checker=False)
    )
    drawn = unchecked.generate(key(model=model), specs)
    for flagged, plain in zip(results, drawn, strict=True):
        assert np.asarray(flagged.image).max() > 0
        assert np.array_equal(np.asarray(flagged.image), np.asarray(plain.image))


def test_generate_rejects_other_modes_and_accepts_empty(runner: PipelineRunner) -> None:
    with pytest.raises(ValueError, match="text, image"):
        runner.generate(key(mode="video"), SPECS[:1])
    with pytest.raises(ValueError, match="init image"):
        runner.generate(key(mode="image", image_steps=2), SPECS[:1])
    assert runner.generate(key(), []) == []


@pytest.mark.parametrize("scheduler", ["DPM++ 2M", "Euler a"])
def test_own_decoding_matches_a_plain_pipeline_call(runner: PipelineRunner, scheduler: str) -> None:
    pipe = with_scheduler(runner.load("tiny"), scheduler)
    plain = pipe(
        prompt=[s.prompt for s in SPECS[:2]],
        negative_prompt=[s.negative_prompt for s in SPECS[:2]],
        generator=[torch.Generator().manual_seed(s.seed) for s in SPECS[:2]],
        num_inference_steps=4,
        guidance_scale=7.5,
        width=64,
        height=128,
        output_type="pil",
    ).images
    ours = runner.generate(key(scheduler, 64, 128), SPECS[:2])
    for image, result in zip(plain, ours, strict=True):
        assert result.error is None
        assert np.abs(np.asarray(image, dtype=np.int16) - pixels(result)).max() <= 1


@contextmanager
def decoder_fault(
    pipe: StableDiffusionPipeline, breaks: Callable[[int, torch.Tensor], bool]
) -> Iterator[list[torch.dtype]]:
    """Make the VAE decoder return NaN on the calls where
    `breaks(call_number, output)` holds; yields the dtype of each decoder call."""
    calls: list[torch.dtype] = []

    def hook(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        calls.append(output.dtype)
        if breaks(len(calls), output):
            output = output.clone()
            output[...] = float("nan")
        return output

    handle = pipe.vae.decoder.register_forward_hook(hook)
    try:
        yield calls
    finally:
        handle.remove()


def test_nan_on_the_first_decode_is_retried(runner: PipelineRunner) -> None:
    clean = runner.generate(key(), SPECS[:3])
    with decoder_fault(runner.load("tiny"), lambda call, _: call == 1) as calls:
        retried = runner.generate(key(), SPECS[:3])
    assert len(calls) == 4  # one image at a time, then the first image once more
    for before, after in zip(clean, retried, strict=True):
        assert after.error is None
        assert np.array_equal(pixels(before), pixels(after))


def test_nan_that_stays_marks_only_its_own_image(runner: PipelineRunner) -> None:
    clean = runner.generate(key(), SPECS[:3])
    with (
        decoder_fault(runner.load("tiny"), lambda call, _: call in (2, 4)) as calls,
        warnings.catch_warnings(),
    ):
        # NaN must never reach the uint8 cast, whose result numpy leaves undefined.
        warnings.simplefilter("error", RuntimeWarning)
        results = runner.generate(key(), SPECS[:3])
    assert len(calls) == 4  # three images, then the second again
    assert [r.error for r in results] == [None, BLANK_IMAGE_ERROR, None]
    assert np.asarray(results[1].image).max() == 0  # black, never garbage
    assert not results[1].withheld
    for i in (0, 2):
        assert np.array_equal(pixels(clean[i]), pixels(results[i]))


def test_every_image_blank_after_the_retry(runner: PipelineRunner) -> None:
    with decoder_fault(runner.load("tiny"), lambda *_: True):
        results = runner.generate(key(), SPECS[:2])
    assert all(r.error == BLANK_IMAGE_ERROR for r in results)
    assert all(r.image.size == (64, 64) for r in results)


def test_float16_overflow_is_cured_by_a_float32_decode(models_dir: Path) -> None:
    """The real-world case: the fp16 VAE gives NaN, the float32 retry does not, and the VAE is
    back in float16 afterwards (so is everything else)."""
    half = PipelineRunner(PipelineOptions(device="cpu", dtype="float16", cache_dir=models_dir))
    pipe = half.load("tiny")
    assert pipe.vae.dtype == torch.float16
    with decoder_fault(pipe, lambda _, output: output.dtype == torch.float16) as calls:
        results = half.generate(key(steps=2), SPECS[:2])
    assert calls == [torch.float16, torch.float16, torch.float32, torch.float32]
    assert all(r.error is None and np.asarray(r.image).std() > 1 for r in results)
    assert pipe.vae.dtype == pipe.unet.dtype == torch.float16


def test_progress_reports_each_step_with_previews_every_few(runner: PipelineRunner) -> None:
    seen: list[tuple[int, int, list | None]] = []
    runner.generate(
        key("Euler"), SPECS[:2], progress=lambda *step: seen.append(step), preview_every=2
    )
    assert [(done, total) for done, total, _ in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [previews is not None for _, _, previews in seen] == [False, True, False, False]
    previews = seen[1][2]
    assert len(previews) == 2 and previews[0].size == (32, 32)  # 8×8 latents, scaled ×4
    assert np.asarray(previews[0]).std() > 1 and previews[0].tobytes() != previews[1].tobytes()


def test_interrupt_stops_the_call_and_the_next_call_runs(runner: PipelineRunner) -> None:
    steps: list[int] = []

    def stop_after_first(done: int, _total: int, _previews: object) -> None:
        steps.append(done)
        runner.interrupt()

    with pytest.raises(Interrupted):
        runner.generate(key("Euler"), SPECS[:1], progress=stop_after_first)
    assert steps == [1]
    with pytest.raises(Interrupted):  # an interrupt also stops calls that start after it...
        runner.generate(key("Euler"), SPECS[:1])
    runner.resume()  # ...until the executor resumes for its next batch
    assert len(runner.generate(key("Euler"), SPECS[:1])) == 1


@pytest.mark.parametrize("mode", ["text", "image"])
def test_diffusers_still_skips_the_steps_left_after_an_interrupt(
    runner: PipelineRunner, mode: str
) -> None:
    """The runner stops a call by setting the pipeline's private `_interrupt`, which diffusers
    reads through its `interrupt` property (`if self.interrupt: continue`) in each step of the
    denoising loop. pyproject pins no upper bound on diffusers: an upgrade that stops honouring
    it would run all six UNet passes here, and a cancelled call would run to its end."""
    unet = runner.load("tiny").unet
    passes: list[int] = []
    hook = unet.register_forward_hook(lambda *_: passes.append(1))
    init = Image.new("RGB", (64, 64), "grey")  # mode "image" starts from it; "text" ignores it
    chosen = key("Euler", mode=mode, steps=6, image_steps=6 if mode == "image" else None)
    seen: list[int] = []

    def interrupt_at_first_step(done: int, _total: int, _previews: object) -> None:
        seen.append(done)
        runner.interrupt()

    try:
        with pytest.raises(Interrupted):
            runner.generate(
                chosen,
                [ImageSpec("a cat", "", 1, init_image=init)],
                progress=interrupt_at_first_step,
            )
    finally:
        hook.remove()
        runner.resume()
    # The interrupt is heard at the end of the step after it (the runner sets `_interrupt`
    # there), so two of the six steps run, each one UNet pass for both guidance halves.
    assert seen == [1]
    assert len(passes) == 2


def test_resolve_device() -> None:
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert resolve_device("auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu") == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    with pytest.raises(ValueError, match="float16"):
        resolve_device("cpu", "float8")
    with pytest.raises(ValueError, match="auto, cpu"):
        resolve_device("tpu")
