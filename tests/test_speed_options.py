"""The speed settings change how a batch runs, never which pixels a member gets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bot.pipelines import MemoryFit, PipelineOptions, PipelineRunner, padded_batch_size
from bot.ray_workers import DeviceHost
from bot.requests import BatchKey, ImageSpec
from bot.workers import Call

SPECS = [
    ImageSpec("a red cat on a sofa", "", 11),
    ImageSpec("a dog", "blurry", 22),
    ImageSpec("mountains at dawn, oil painting", "people", 33),
    ImageSpec("x", "y", 44),
    ImageSpec("a lighthouse", "", 55),
]
KEY = BatchKey("tiny", "text", 64, 64, steps=3, scheduler="Euler a")


def runner_with(model_cache: Path, **options: Any) -> PipelineRunner:
    runner = PipelineRunner(PipelineOptions(device="cpu", cache_dir=model_cache, **options))
    runner.load("tiny")
    return runner


def assert_same_pictures(expected: list[Any], got: list[Any]) -> None:
    assert len(expected) == len(got)
    for a, b in zip(expected, got, strict=True):
        diff = np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max()
        assert diff <= 1, f"pixels moved by {diff}/255"


def decoder_batches(runner: PipelineRunner) -> tuple[list[int], Any]:
    """Record the batch size of every VAE decoder call."""
    sizes: list[int] = []
    decoder = runner.load("tiny").vae.decoder
    handle = decoder.register_forward_hook(lambda _m, inputs, _o: sizes.append(len(inputs[0])))
    return sizes, handle


@pytest.mark.parametrize(
    ("images", "cap", "bucket"),
    [
        (1, 8, 1),
        (2, 8, 2),
        (3, 8, 4),
        (4, 8, 4),
        (5, 8, 8),
        (8, 8, 8),
        (5, 6, 6),
        (6, 6, 6),
        (3, 3, 3),
        (9, 16, 16),
        (7, 4, 7),
    ],
)
def test_batches_pad_to_the_next_power_of_two_within_the_cap(images, cap, bucket):
    assert padded_batch_size(images, cap) == bucket


def test_vae_decode_batch_slices_the_decode_and_keeps_the_pixels(tiny_runner, model_cache):
    whole = runner_with(model_cache, vae_decode_batch=4)
    sizes, handle = decoder_batches(whole)
    try:
        together = whole.generate(KEY, SPECS)
    finally:
        handle.remove()
    assert sizes == [4, 1]

    sizes, handle = decoder_batches(tiny_runner)  # the default: one image per decode
    try:
        one_by_one = tiny_runner.generate(KEY, SPECS)
    finally:
        handle.remove()
    assert sizes == [1] * 5
    assert_same_pictures(together, one_by_one)


def test_channels_last_keeps_the_pixels(tiny_runner, model_cache):
    runner = runner_with(model_cache, channels_last=True)
    unet = runner.load("tiny").unet
    weight = next(p for p in unet.parameters() if p.dim() == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_pictures(tiny_runner.generate(KEY, SPECS[:3]), runner.generate(KEY, SPECS[:3]))


def test_compiled_unet_pads_batches_so_a_bucket_compiles_once(tiny_runner, model_cache):
    """torch.compile with a backend that counts its graphs: batches of 3 and 4 images share the
    bucket of 4 and so one compilation; the padding never reaches the member's results."""
    graphs: list[int] = []

    def counting_backend(graph: torch.fx.GraphModule, example_inputs: list[Any]):
        graphs.append(len(example_inputs))
        return graph.forward

    torch._dynamo.reset()
    runner = runner_with(
        model_cache, compile_unet=True, compile_backend=counting_backend, max_batch_size=4
    )
    try:
        seen: list[tuple[int, int, Any]] = []
        three = runner.generate(
            KEY, SPECS[:3], progress=lambda *step: seen.append(step), preview_every=1
        )
        compiled_for_four = len(graphs)
        assert compiled_for_four > 0, "the UNet was not compiled"
        assert [len(previews) for _, _, previews in seen if previews] == [3, 3]
        four = runner.generate(KEY, SPECS[:4])
        assert len(graphs) == compiled_for_four, "a batch of 4 compiled again"
        runner.generate(KEY, SPECS[:1])
        assert len(graphs) > compiled_for_four, "a batch of 1 is its own bucket"
    finally:
        torch._dynamo.reset()
    assert_same_pictures(tiny_runner.generate(KEY, SPECS[:3]), three)
    assert_same_pictures(tiny_runner.generate(KEY, SPECS[:4]), four)


def test_memory_fit_scales_the_per_image_cost_with_pixels():
    gib = 2**30
    fit = MemoryFit(
        fixed_bytes=2 * gib,
        per_image_bytes=4 * gib,
        probe_pixels=1024 * 1024,
        free_bytes=20 * gib,
    )
    # 20 GiB × 0.85 = 17 GiB, 2 fixed: 15 GiB for images of 4 GiB at 1024², 1 GiB at 512².
    assert fit.images_that_fit(1024 * 1024) == 3
    assert fit.images_that_fit(512 * 512) == 15
    assert fit.images_that_fit(768 * 512) == 10
    tight = MemoryFit(
        fixed_bytes=2 * gib, per_image_bytes=4 * gib, probe_pixels=1024**2, free_bytes=3 * gib
    )
    assert tight.images_that_fit(1024 * 1024) == 1  # one is always tried; OOM handling follows


def test_nothing_is_measured_on_a_cpu(tiny_runner):
    assert tiny_runner.batch_limit(KEY) is None


GIB = 2**30


class SimulatedAllocator:
    """Stands in for the CUDA allocator's counters, which this machine lacks: a call's peak is
    `fixed` plus `per_image` for each image the UNet saw (two samples per image, for guidance),
    over 1 GiB of weights; a call of more than `fits` images raises CUDA's out-of-memory error."""

    def __init__(self, runner, *, fixed, per_image, free, fits=99):
        self.fixed, self.per_image, self.free_bytes, self.fits = fixed, per_image, free, fits
        self.images = 0
        self.unet_batches = []
        unet = runner.load("tiny").unet
        self.handle = unet.register_forward_pre_hook(self._saw)

    def _saw(self, _module, args):
        samples = len(args[0])
        self.unet_batches.append(samples)
        if samples // 2 > self.fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.images = max(self.images, samples // 2)

    def start(self):
        self.images = 0
        return GIB

    def peak(self):
        return GIB + self.fixed + self.per_image * self.images

    def free(self):
        return self.free_bytes


def probe(model_cache, caplog, **allocator):
    runner = runner_with(model_cache, largest_side=64)
    meter = SimulatedAllocator(runner, **allocator)
    try:
        with caplog.at_level("INFO", logger="bot.pipelines.runner"):
            fit = runner.measure_memory("tiny", meter)
    finally:
        meter.handle.remove()
    return runner, meter, fit


def test_memory_probe_runs_one_then_two_images_and_limits_each_size(model_cache, caplog):
    runner, meter, fit = probe(model_cache, caplog, fixed=2 * GIB, per_image=4 * GIB, free=20 * GIB)
    assert meter.unet_batches == [2, 4]  # one step of one image, then of two
    assert (fit.fixed_bytes, fit.per_image_bytes, fit.probe_pixels) == (2 * GIB, 4 * GIB, 64 * 64)
    # 20 GiB × 0.85 − 2 GiB leaves 15 GiB: three 4 GiB images at 64², one at twice the pixels.
    assert runner.batch_limit(KEY) == 3
    assert runner.batch_limit(replace(KEY, height=128)) == 1
    assert "at most 3 image(s) at 64×64" in caplog.text


def test_memory_probe_when_two_images_do_not_fit(model_cache, caplog):
    runner, meter, fit = probe(
        model_cache, caplog, fixed=2 * GIB, per_image=4 * GIB, free=20 * GIB, fits=1
    )
    assert meter.unet_batches == [2, 4]
    # Without the second point, the whole of one call counts as the image's.
    assert (fit.fixed_bytes, fit.per_image_bytes) == (0, 6 * GIB)
    assert runner.batch_limit(KEY) == 2


def test_memory_probe_when_no_image_fits(model_cache, caplog):
    runner, _meter, fit = probe(
        model_cache, caplog, fixed=2 * GIB, per_image=4 * GIB, free=3 * GIB, fits=0
    )
    assert fit is None and runner.batch_limit(KEY) is None  # out-of-memory splitting remains
    assert "one 64×64 image does not fit in the 3.0 GiB of GPU memory" in caplog.text
    assert "lower MAX_SIZE" in caplog.text


def test_attention_runs_through_torchs_fused_kernel_by_default(tiny_runner):
    """SDPA (torch.nn.functional.scaled_dot_product_attention) is diffusers' default processor
    under torch 2; ATTENTION_SLICING is the only setting that swaps it out."""
    pipe = tiny_runner.load("tiny")
    for model in (pipe.unet, pipe.vae):
        assert {type(p).__name__ for p in model.attn_processors.values()} == {"AttnProcessor2_0"}


def test_a_ray_worker_sends_what_its_memory_probe_found_with_every_answer(model_cache):
    """The host of a Ray worker (run here without Ray) answers `ready` and each call with its
    resident models and its probe's findings, which the bot's batch caps then follow."""
    options = PipelineOptions(device="cpu", cache_dir=model_cache, largest_side=64)
    host = DeviceHost(options, None, ("tiny",))
    _pid, (models, fits) = host.ready()
    assert models == {"tiny"} and fits == {}  # a CPU measures nothing
    runner = host._runner  # the probe's allocator stands in for CUDA's on this machine
    meter = SimulatedAllocator(runner, fixed=2 * GIB, per_image=4 * GIB, free=20 * GIB)
    try:
        runner.measure_memory("tiny", meter)
    finally:
        meter.handle.remove()
    images, _steps, (models, fits) = host.generate(Call(KEY, SPECS[:2], [1, 2]), 1, 0)
    assert len(images) == 2 and models == {"tiny"}
    assert fits["tiny"].images_that_fit(64 * 64) == runner.batch_limit(KEY) == 3
