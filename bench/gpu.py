"""Stable Diffusion 1.5 shapes with random weights: what a GPU does with our batches.

Parts: `unet` (samples per second and peak memory by batch size, dtype and variant: eager,
channels_last, attention slicing, torch.compile), `vae` (decode time by VAE_DECODE_BATCH),
`executor` (our executor, with each `--variant` of its settings, against a sequential batch-1
executor under a burst of mixed jobs, image-to-image among them, and under Poisson arrivals at a
share of the burst's throughput, with the share of the FLOP ceiling).
Nothing is downloaded: the models are built from SD 1.5's configs, written out below, and
their FLOPs are counted on the meta device against the named fact before anything runs.
`--small` shrinks the models (and uses the tiny model for the executor) so the run finishes on
a 2-core CPU in a few minutes; its numbers say nothing about a GPU.

    .venv/bin/python -m bench.gpu                      # on a GPU
    .venv/bin/python -m bench.gpu --parts executor --variant TORCH_COMPILE=true
    .venv/bin/python -m bench.gpu --small --device cpu
"""

from __future__ import annotations

import os

# Before diffusers/huggingface_hub are imported: nothing here comes from the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import asyncio
import copy
import itertools
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from bench.common import (
    Probe,
    ServiceRun,
    bench_settings,
    environment,
    quiet_libraries,
    run_jobs,
    start_service,
)
from bench.mix import sample_requests
from bench.report import percentile, table, write_json
from bot.images import png_bytes
from bot.pipelines import (
    SD15_SCHEDULER_CONFIG,
    decode_latents,
    resolve_device,
    tiny_tokenizer,
)
from bot.requests import BatchKey, GenerationRequest, ImageSpec, RawOptions

H100_SXM_DENSE_BF16_TFLOPS = 989.0
# One 512×512 image with guidance: 1.6065 TFLOP per step, 2.54 TFLOP besides (named fact).
FACT_TFLOP_PER_STEP, FACT_TFLOP_FIXED = 1.6065, 2.54


def unet_config(small: bool) -> dict[str, Any]:
    """SD 1.5's unet/config.json; --small keeps its block structure at a tenth of the width."""
    config: dict[str, Any] = {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
    }
    if small:
        config.update(sample_size=16, block_out_channels=(32, 64, 128, 128), cross_attention_dim=64)
    return config


def vae_config(small: bool) -> dict[str, Any]:
    """SD 1.5's vae/config.json; --small at a quarter of the width and 128-pixel images."""
    config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "block_out_channels": (128, 256, 512, 512),
        "layers_per_block": 2,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    }
    if small:
        config.update(block_out_channels=(32, 32, 64, 64), sample_size=128)
    return config


def text_config(tokenizer: Any) -> CLIPTextConfig:
    """CLIP ViT-L/14's text tower, as SD 1.5 uses it; token ids follow the offline tokenizer."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        projection_dim=768,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def save_sd15_pipeline(folder: Path, device: torch.device, dtype: torch.dtype) -> Path:
    """A full-size SD 1.5 pipeline with random weights, saved as `save_pretrained` writes a
    real one, so the bot's own loading code reads it."""
    tokenizer = tiny_tokenizer()
    with torch.device(device):
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**vae_config(small=False)),
            text_encoder=CLIPTextModel(text_config(tokenizer)),
            tokenizer=tokenizer,
            unet=UNet2DConditionModel(**unet_config(small=False)),
            scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.to(dtype=dtype).save_pretrained(folder)
    return folder


class PeakMemory:
    """Peak memory inside the block, in MiB: the CUDA allocator's peak (weights included) on a
    GPU; on Linux CPUs the growth of the resident set over its size at entry; else None."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mib: float | None = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:  # "5" resets the kernel's high-water mark (VmHWM) to the current RSS
                Path("/proc/self/clear_refs").write_text("5")
                self._base = _status_kib("VmRSS")
            except OSError:
                self._base = -1
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._base >= 0:
            self.mib = max(0, _status_kib("VmHWM") - self._base) / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def timed_median(work: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of `repeats` calls after two warm-up calls, waiting for the device."""

    def once() -> float:
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    once()
    once()
    return statistics.median(once() for _ in range(repeats))


def measure(work: Callable[[], object], device: torch.device, repeats: int) -> dict[str, Any]:
    """The first call's seconds (compiling, if any) and peak memory, then the median of timed
    calls; {"error": "OOM"} when the device runs out of memory."""
    try:
        start = time.perf_counter()
        with PeakMemory(device) as memory:
            work()
        first = time.perf_counter() - start
        seconds = timed_median(work, device, repeats)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"error": "OOM"}
    return {"first_call_s": first, "seconds": seconds, "peak_mib": memory.mib}


def mib_text(mib: float | None) -> str:
    return "n/a" if mib is None else f"{mib:.0f}"


def memory_note(device: torch.device) -> str:
    if device.type == "cuda":
        return "peak MiB = torch.cuda.max_memory_allocated, weights included"
    return "peak MiB = growth of the process's resident set during the first call"


def unet_model(base: torch.nn.Module, dtype: torch.dtype, variant: str) -> torch.nn.Module:
    """A copy of `base` set up as the variant runs it."""
    model = copy.deepcopy(base).to(dtype=dtype)
    if variant == "channels_last":
        model.to(memory_format=torch.channels_last)
    elif variant == "attention slicing":
        model.set_attention_slice("auto")  # what ATTENTION_SLICING=true does to the UNet
    elif variant == "compile":
        model = torch.compile(model)
    return model


def unet_part(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """Samples per second of one UNet forward (a sample is one latent; guidance makes two per
    image), by dtype, variant and batch size; peak memory of the same calls."""
    config = unet_config(args.small)
    side, width = config["sample_size"], config["cross_attention_dim"]
    with torch.device(device):
        base = UNet2DConditionModel(**config).eval()
    variants = ["eager", "channels_last", "attention slicing"]
    if args.compile:
        variants.append("compile")
    rows, results = [], []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for variant in variants:
            model = unet_model(base, dtype, variant)
            memory_format = torch.channels_last if variant == "channels_last" else None
            for batch in args.batch_sizes:
                latents = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
                if memory_format is not None:
                    latents = latents.contiguous(memory_format=memory_format)
                text = torch.randn(batch, 77, width, device=device, dtype=dtype)
                timestep = torch.tensor(999, device=device)

                def forward(m=model, x=latents, t=timestep, c=text) -> None:
                    with torch.inference_mode():
                        m(x, t, encoder_hidden_states=c)

                entry = {
                    "dtype": dtype_name,
                    "variant": variant,
                    "batch": batch,
                    **measure(forward, device, args.repeats),
                }
                results.append(entry)
                if "error" in entry:
                    rows.append([dtype_name, variant, batch, entry["error"], "", "", ""])
                    break  # larger batches will not fit either
                entry["samples_per_s"] = batch / entry["seconds"]
                rows.append(
                    [
                        dtype_name,
                        variant,
                        batch,
                        f"{entry['samples_per_s']:.1f}",
                        f"{entry['seconds'] * 1000:.1f}",
                        mib_text(entry["peak_mib"]),
                        f"{entry['first_call_s']:.1f}",
                    ]
                )
                print(f"unet {dtype_name} {variant} {batch}: done", flush=True)
            del model
    print(f"\nUNet forward, latents {side}×{side}, {memory_note(device)}")
    print(
        table(
            ["dtype", "variant", "batch", "samples/s", "ms/call", "peak MiB", "first call s"],
            rows,
        )
    )
    return results


def vae_part(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """VAE decode seconds per image by batch size through the bot's own decode, with
    VAE_DECODE_BATCH at the batch size (all at once) and at 1; peak memory of the same calls."""
    config = vae_config(args.small)
    side = config["sample_size"] // 8
    with torch.device(device):
        base = AutoencoderKL(**config).eval()
    rows, results = [], []
    for dtype_name in args.vae_dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        vae = copy.deepcopy(base).to(dtype=dtype)
        for one_by_one in (False, True):
            for batch in args.vae_batch_sizes:
                if one_by_one and batch == 1:
                    continue  # the same call as the row above
                latents = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
                slice_size = 1 if one_by_one else batch

                def decode(v=vae, z=latents, n=slice_size) -> None:
                    with torch.inference_mode():
                        decode_latents(v, z, n)

                entry = {
                    "dtype": dtype_name,
                    "vae_decode_batch": slice_size,
                    "batch": batch,
                    **measure(decode, device, args.repeats),
                }
                results.append(entry)
                if "error" in entry:
                    rows.append([dtype_name, slice_size, batch, entry["error"], ""])
                    break
                per_image = entry["seconds"] / batch * 1000
                rows.append(
                    [dtype_name, slice_size, batch, f"{per_image:.1f}", mib_text(entry["peak_mib"])]
                )
                print(f"vae {dtype_name} {batch} by {slice_size}: done", flush=True)
        del vae
    print(f"\nVAE decode to {config['sample_size']}² pixels, {memory_note(device)}")
    print(table(["dtype", "VAE_DECODE_BATCH", "batch", "ms/image", "peak MiB"], rows))
    return results


def scaled(request: GenerationRequest, small: bool) -> GenerationRequest:
    """With --small, sides an eighth and steps a third, so the tiny model runs the mix fast."""
    if not small:
        return request
    return replace(
        request,
        width=request.width // 8,
        height=request.height // 8,
        steps=max(1, round(request.steps / 3)),
    )


def as_raw(request: GenerationRequest) -> RawOptions:
    return RawOptions(
        request.prompt,
        seed=request.seed,
        steps=request.steps,
        guidance=request.guidance,
        width=request.width,
        height=request.height,
        scheduler=request.scheduler,
        count=request.count,
        strength=request.strength,
    )


def upload_for(request: GenerationRequest, rng: random.Random) -> bytes | None:
    """A member's upload for an image-to-image request (noise of the request's size), else
    None; the bot fits it to the default area as it fits any upload."""
    if request.mode != "image":
        return None
    noise = rng.randbytes(request.width * request.height * 3)
    return png_bytes(PIL.Image.frombytes("RGB", (request.width, request.height), noise))


def flop_key(request: GenerationRequest) -> BatchKey:
    """The request's batch key with the scheduler left out: FLOPs do not depend on it."""
    return replace(request.batch_key, scheduler="Euler")


def count_flops(runner: Any, requests: list[GenerationRequest], flops: dict) -> None:
    """Add to `flops` the FLOPs of one image of each new batch key (scheduler aside), counted
    by torch over a real call; image-to-image calls include encoding their init image."""
    for request in requests:
        key = flop_key(request)
        if key in flops:
            continue
        init = None
        if key.mode == "image":
            init = PIL.Image.new("RGB", (key.width, key.height), (128, 96, 64))
        with FlopCounterMode(display=False) as counter:
            runner.generate(key, [ImageSpec("count", "", 0, request.guidance, init)])
        flops[key] = counter.get_total_flops()


def work_of(requests: list[GenerationRequest], flops: dict) -> float:
    return sum(flops[flop_key(r)] * r.count for r in requests)


def assignments(items: list[str]) -> dict[str, str]:
    """["NAME=VALUE", ...] as a dict of bot setting variables."""
    return dict(item.split("=", 1) for item in items)


def executor_variants(args: argparse.Namespace) -> list[tuple[str, dict[str, str]]]:
    """Our executor, each --variant of it, and the sequential batch-1 executor, all with the
    --setting variables; named by what differs."""
    common = assignments(args.setting)
    ours = {**common, "MAX_BATCH_SIZE": str(args.max_batch_size)}
    runs = [(f"MAX_BATCH_SIZE={args.max_batch_size}", ours)]
    for variant in args.variant:
        name = f"MAX_BATCH_SIZE={args.max_batch_size}, {variant}"
        runs.append((name, {**ours, **assignments(variant.split(","))}))
    runs.append(("MAX_BATCH_SIZE=1", {**common, "MAX_BATCH_SIZE": "1"}))
    return runs


async def executor_part(args: argparse.Namespace, device: torch.device, folder: Path) -> dict:
    """Our executor (and its variants) and a batch-1 executor, each under the same bursts and
    the same Poisson arrivals, all loaded side by side on the same device and run in turn."""
    variants = executor_variants(args)
    if args.small:
        model_id = "tiny"
        # Uploads are fitted to the default area: the tiny model's 64×64.
        variants = [(n, {"DEFAULT_WIDTH": "64", "DEFAULT_HEIGHT": "64", **o}) for n, o in variants]
    else:
        dtype_name = assignments(args.setting).get("DTYPE", "auto")
        _, dtype = resolve_device(args.device, None if dtype_name == "auto" else dtype_name)
        print("building a random-weight SD 1.5 pipeline ...", flush=True)
        model_id = str(save_sd15_pipeline(folder / "sd15-random", device, dtype))
    rng = random.Random(args.seed)
    burst, poisson = (
        [scaled(r, args.small) for r in sample_requests(rng, args.jobs, model=model_id)]
        for _ in range(2)
    )
    # The goal's case: the same number of plain 512×512, 30-step jobs, which all batch.
    uniform = [
        scaled(
            replace(
                r,
                width=512,
                height=512,
                steps=30,
                scheduler="DPM++ 2M",
                count=1,
                mode="text",
                strength=None,
            ),
            args.small,
        )
        for r in sample_requests(rng, args.jobs, model=model_id)
    ]
    uploads = {
        name: [upload_for(r, rng) for r in jobs]
        for name, jobs in (("burst", burst), ("Poisson", poisson))
    }
    loads = {
        "burst": ([as_raw(r) for r in burst], uploads["burst"]),
        "30-step burst": ([as_raw(r) for r in uniform], None),
    }
    flops: dict = {}
    samples: dict[str, list[ServiceRun]] = {}
    warm_up: dict[str, float] = {}
    services: dict[str, tuple[Any, Probe]] = {}
    try:
        for index, (name, overrides) in enumerate(variants):
            settings = bench_settings(
                folder / f"run-{index}", model_id=model_id, device=args.device, overrides=overrides
            )
            probe = Probe()
            services[name] = (await start_service(settings, probe), probe)
        # Both bursts once first, so every shape's kernels (and compiled graphs) are ready
        # before the timed rounds; how long that took is reported as the warm-up.
        for name, (service, probe) in services.items():
            started = time.perf_counter()
            for raws, pngs in loads.values():
                await run_jobs(service, probe, raws, None, pngs)
            warm_up[name] = time.perf_counter() - started
        for _ in range(args.rounds):  # interleaved, so drift in the machine hits every one
            for name, (service, probe) in services.items():
                for arrivals, (raws, pngs) in loads.items():
                    run = await run_jobs(service, probe, raws, None, pngs)
                    samples.setdefault(f"{name}, {arrivals}", []).append(run)
        medians = {
            label: sorted(taken, key=lambda run: run.seconds)[len(taken) // 2]
            for label, taken in samples.items()
        }
        # Poisson arrivals at a share of our executor's median burst throughput.
        rate = args.load * len(burst) / medians[f"{variants[0][0]}, burst"].seconds
        offsets = list(itertools.accumulate(rng.expovariate(rate) for _ in poisson))
        for name, (service, probe) in services.items():
            raws = [as_raw(r) for r in poisson]
            medians[f"{name}, Poisson"] = await run_jobs(
                service, probe, raws, offsets, uploads["Poisson"]
            )
            print(f"executor {name} done", flush=True)
        first_runner = next(iter(services.values()))[0].runner
        count_flops(first_runner, [r for run in medians.values() for r in run.requests], flops)
    finally:
        for service, _ in services.values():
            await service.close()
    arrivals = ("burst", "30-step burst", "Poisson")
    runs = {f"{name}, {a}": medians[f"{name}, {a}"] for name, _ in variants for a in arrivals}

    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = H100_SXM_DENSE_BF16_TFLOPS
    rows, report = [], {}
    for name, run in runs.items():
        tflops = work_of(run.requests, flops) / run.seconds / 1e12
        share = None if peak is None else tflops / peak
        report[name] = {
            "seconds": run.seconds,
            "images": run.images,
            "images_per_s": run.images / run.seconds,
            "latency_p50_s": percentile(run.latencies, 50),
            "latency_p95_s": percentile(run.latencies, 95),
            "calls": run.calls,
            "images_per_call": run.images / run.calls,
            "tflops": tflops,
            "share_of_ceiling": share,
        }
        if name.endswith(", burst"):
            report[name]["warm_up_s"] = warm_up[name.removesuffix(", burst")]
        r = report[name]
        rows.append(
            [
                name,
                f"{r['images_per_s']:.2f}",
                f"{r['latency_p50_s']:.2f}",
                f"{r['latency_p95_s']:.2f}",
                f"{r['images_per_call']:.2f}",
                f"{tflops:.4g}",
                "n/a" if share is None else f"{share:.1%}",
            ]
        )
    ceiling = "none given" if peak is None else f"{peak:g} TFLOP/s"
    print(
        f"\nexecutor, {args.jobs} jobs each, bursts median of {args.rounds} interleaved rounds; "
        f"Poisson arrivals at {args.load:.0%} of our executor's burst throughput; "
        f"FLOP ceiling {ceiling}"
    )
    print(
        table(
            [
                "executor, arrivals",
                "images/s",
                "p50 latency s",
                "p95 latency s",
                "images/call",
                "TFLOP/s",
                "share of ceiling",
            ],
            rows,
        )
    )
    sequential = report["MAX_BATCH_SIZE=1, burst"]["images_per_s"]
    goals = {}
    for name, _ in variants[:-1]:
        speedup = report[f"{name}, burst"]["images_per_s"] / sequential
        share = report[f"{name}, 30-step burst"]["share_of_ceiling"]
        goals[name] = {"burst_speedup": speedup, "share_at_30_steps": share}
        print(
            f"{name}: burst {speedup:.2f}× the sequential executor (goal ≥ 3); 30-step burst at "
            + ("n/a" if share is None else f"{share:.1%}")
            + " of the FLOP ceiling (goal ≥ 45%); warm-up "
            + f"{warm_up[name]:.1f} s (both bursts once: kernels and compilation)"
        )
    return {
        "model": model_id if args.small else "random-weight SD 1.5",
        "goals": goals,
        "peak_tflops": peak,
        "flops_per_image": {
            f"{k.mode} {k.width}x{k.height} {k.steps} steps"
            + ("" if k.cfg else " no CFG")
            + ("" if k.image_steps is None else f" {k.image_steps} from the image"): f
            for k, f in flops.items()
        },
        "img2img_jobs": {
            "burst": sum(r.mode == "image" for r in burst),
            "Poisson": sum(r.mode == "image" for r in poisson),
        },
        "runs": report,
        "poisson_offsets_s": offsets,
    }


def flop_check() -> dict[str, float]:
    """Count full-size SD 1.5 FLOPs on the meta device (shapes only, no arithmetic), to check
    the configs against the named fact of 1.6065 TFLOP per guided 512×512 step."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config(small=False))
        vae = AutoencoderKL(**vae_config(small=False))
        with FlopCounterMode(display=False) as step:  # guidance: two latents per image
            unet(torch.randn(2, 4, 64, 64), torch.tensor(999), torch.randn(2, 77, 768))
        with FlopCounterMode(display=False) as decode:
            vae.decode(torch.randn(1, 4, 64, 64))
    result = {
        "unet_params_m": sum(p.numel() for p in unet.parameters()) / 1e6,
        "vae_params_m": sum(p.numel() for p in vae.parameters()) / 1e6,
        "guided_step_tflop": step.get_total_flops() / 1e12,
        "vae_decode_tflop": decode.get_total_flops() / 1e12,
    }
    print(
        f"SD 1.5 shapes: UNet {result['unet_params_m']:.1f} M parameters, VAE "
        f"{result['vae_params_m']:.2f} M; one guided 512×512 step "
        f"{result['guided_step_tflop']:.4f} TFLOP (fact: {FACT_TFLOP_PER_STEP}), "
        f"VAE decode {result['vae_decode_tflop']:.2f} TFLOP "
        f"(fact: {FACT_TFLOP_FIXED} with the text encoder)"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="reduced sizes, for a CPU")
    parser.add_argument("--device", default="auto", help="as DEVICE")
    parser.add_argument("--parts", default="unet,vae,executor")
    parser.add_argument("--batch-sizes", help="default 1,2,4,8,16,32; with --small 1,2,4,8")
    parser.add_argument("--dtypes", help="default float16,bfloat16; on a CPU float32,bfloat16")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="also time torch.compile (default: on, except with --small)",
    )
    parser.add_argument("--vae-batch-sizes", help="default as --batch-sizes; with --small 1,4")
    parser.add_argument("--vae-dtypes", help="default as --dtypes; with --small the first one")
    parser.add_argument("--repeats", type=int, help="timed calls after 2 warm-ups; default 5, 3")
    parser.add_argument("--jobs", type=int, default=32, help="jobs in the burst and in Poisson")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each burst")
    parser.add_argument("--load", type=float, default=0.7, help="Poisson rate, share of burst")
    parser.add_argument("--max-batch-size", type=int, default=8, help="as MAX_BATCH_SIZE")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a bot setting for every executor run, e.g. DTYPE=bfloat16 (repeatable)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=VALUE[,NAME=VALUE]",
        help="also run our executor with these settings, e.g. TORCH_COMPILE=true (repeatable)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help=f"the FLOP ceiling; default {H100_SXM_DENSE_BF16_TFLOPS:g} (H100 SXM dense bf16) "
        "on a GPU, none on a CPU",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads; 1 keeps timings steady when other processes share the cores",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, _ = resolve_device(args.device)
    if args.compile is None:
        args.compile = not args.small
    if args.batch_sizes is None:
        args.batch_sizes = "1,2,4,8" if args.small else "1,2,4,8,16,32"
    if args.dtypes is None:
        args.dtypes = "float32,bfloat16" if device.type == "cpu" else "float16,bfloat16"
    # A bfloat16 VAE decode takes seconds per image on a CPU without bf16 units.
    if args.vae_dtypes is None:
        args.vae_dtypes = args.dtypes.split(",")[0] if args.small else args.dtypes
    if args.vae_batch_sizes is None:
        args.vae_batch_sizes = "1,4" if args.small else args.batch_sizes
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.vae_batch_sizes = [int(b) for b in args.vae_batch_sizes.split(",")]
    if args.repeats is None:
        args.repeats = 3 if args.small else 5
    quiet_libraries()

    result: dict[str, Any] = {
        "settings": {**vars(args), "out": str(args.out)},
        "environment": environment(),
        "device": str(device),
    }
    result["flop_check"] = flop_check()
    parts = args.parts.split(",")
    if "unet" in parts:
        result["unet"] = unet_part(args, device)
    if "vae" in parts:
        result["vae"] = vae_part(args, device)
    if "executor" in parts:
        with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
            result["executor"] = asyncio.run(executor_part(args, device, Path(tmp)))
    write_json(args.out, result)


if __name__ == "__main__":
    main()
