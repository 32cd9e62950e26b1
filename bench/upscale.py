"""Peak memory of an Upscale ×2 call, with and without the tiled VAE: each configuration runs
in its own process (peak resident memory only grows), the tiny model on the CPU (or a GPU:
`--device cuda`, peak allocated memory), one image, one denoised step.

    .venv/bin/python -m bench.upscale [--device cpu|cuda] [--model tiny] [--sides 1024,2048]

Prints a Markdown table for docs/performance.md ("Upscale memory") and the goal line: a 2048²
result with tiles takes no more memory than a 1024² one without them."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_of(device: str, work: Callable[[], Any]) -> tuple[float, float, Any]:
    """(peak MiB, seconds, result) of `work()`: allocated on a GPU, else the growth of this
    process's peak resident memory (which only grows, hence a process per measurement)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _resident_bytes()
    began = time.perf_counter()
    result = work()
    seconds = time.perf_counter() - began
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    return peak / 2**20, seconds, result


def measure(side: int, tiled: bool, device: str, model: str, cache: Path) -> dict:
    """One upscale call from a (side/2)² parent to side², in this process."""
    from PIL import Image

    from bench.common import quiet_libraries
    from bot import operations
    from bot.pipelines import PipelineOptions, PipelineRunner
    from bot.requests import BatchKey, ImageSpec

    quiet_libraries()
    threshold = 1 if tiled else side * side  # tiles above the threshold, whole at it
    runner = PipelineRunner(
        PipelineOptions(device=device, cache_dir=cache, vae_tiling_pixels=threshold)
    )
    runner.load(model)
    half = side // 2
    chosen = operations.plan("upscale-subtle", half, half, max_side=side, pan_step=8)
    parent = Image.effect_noise((half, half), 64).convert("RGB")
    start = operations.init_image(parent, chosen)
    key = BatchKey(model, "image", side, side, 4, "Euler", cfg=False, image_steps=1)
    spec = ImageSpec("a harbour at dusk", "", 1, 1.0, init_image=start)
    warm = BatchKey(model, "image", 64, 64, 4, "Euler", cfg=False, image_steps=1)
    runner.generate(warm, [ImageSpec("warm", "", 1, 1.0, init_image=start.resize((64, 64)))])
    peak_mib, seconds, image = peak_of(device, lambda: runner.generate(key, [spec])[0].image)
    assert image.size == (side, side)
    return {"side": side, "tiled": tiled, "peak_mib": peak_mib, "seconds": seconds}


# Stable Diffusion 1.5's VAE (its config.json's shapes), for --vae-only.
SD15_VAE = {
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
}


def measure_vae(side: int, tiled: bool, device: str) -> dict:
    """The part tiling changes, at full size: SD 1.5's VAE (random weights) decoding one
    side² image from its latents, whole or with diffusers' tiles as the runner sets them."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD15_VAE).to(device).eval()
    if tiled:
        vae.enable_tiling()
    latents = torch.randn(1, 4, side // 8, side // 8, device=device)
    with torch.no_grad():
        vae.decode(torch.randn(1, 4, 8, 8, device=device))  # warm-up
        peak_mib, seconds, image = peak_of(device, lambda: vae.decode(latents).sample)
    assert image.shape[-2:] == (side, side)
    return {"side": side, "tiled": tiled, "peak_mib": peak_mib, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="tiny")
    parser.add_argument(
        "--sides",
        default="1024,2048",
        help="today's largest result (VAE whole) and the doubled one (whole, then tiled)",
    )
    parser.add_argument(
        "--vae-only",
        action="store_true",
        help="decode with SD 1.5's full-size VAE (random weights) instead of a whole call",
    )
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/)")
    parser.add_argument("--one", nargs=2, metavar=("SIDE", "TILED"), help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.one:  # a child: one configuration
        side, tiled = int(options.one[0]), options.one[1] == "1"
        if options.vae_only:
            print(json.dumps(measure_vae(side, tiled, options.device)))
        else:
            print(json.dumps(measure(side, tiled, options.device, options.model, options.cache)))
        return
    from bench.report import print_goals, table, verdict, write_json

    small, large = (int(side) for side in options.sides.split(","))
    with tempfile.TemporaryDirectory() as folder:
        rows = []
        for side, tiled in ((small, False), (large, False), (large, True)):
            command = [sys.executable, "-m", "bench.upscale", "--one", str(side), str(int(tiled))]
            command += ["--vae-only"] if options.vae_only else []
            child = subprocess.run(
                [*command, "--device", options.device, "--model", options.model, "--cache", folder],
                capture_output=True,
                text=True,
                check=True,
            )
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    what = "allocated on the GPU" if options.device == "cuda" else "resident growth"
    print(
        table(
            ["result", "VAE", f"peak memory of the call ({what})", "seconds"],
            [
                [
                    f"{r['side']}²",
                    "tiled" if r["tiled"] else "whole",
                    f"{r['peak_mib']:.0f} MiB",
                    f"{r['seconds']:.1f}",
                ]
                for r in rows
            ],
        )
    )
    today, whole, tiled = (r["peak_mib"] for r in rows)
    goals = print_goals(
        {
            f"{large}² tiled ({tiled:.0f} MiB) within {small}² whole ({today:.0f} MiB)": verdict(
                tiled <= today
            ),
            f"tiles save memory at {large}² ({whole:.0f} → {tiled:.0f} MiB)": verdict(
                tiled < whole
            ),
        }
    )
    name = f"upscale-{'sd15-vae-' if options.vae_only else ''}{options.device}.json"
    results = options.out or Path(__file__).parent / "results" / name
    model = "SD 1.5 VAE" if options.vae_only else options.model
    write_json(results, {"model": model, "rows": rows, "goals": goals})


if __name__ == "__main__":
    main()
