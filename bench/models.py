"""Model and LoRA switch costs against one call: a model's first load from disk, its reload
after the memory budget unloaded it, and a LoRA set switched per call.

Two models with a budget that holds only one alternate, as two allowlisted models do when
members ask for both; each switch unloads one and loads the other, both timed. LoRA calls are
timed in interleaved rounds, each named by how its LoRA set differs from the call before (the
set is applied once per call), against a call with no LoRA; and the set switch alone.
`tiny` and `tiny-sdxl` with `tiny-lora` run everywhere; with a GPU (or `--full`) also two
SD 1.5-shaped models with random weights and a rank-16 LoRA for them (bench/gpu.py's
builders; nothing is downloaded).

    .venv/bin/python -m bench.models                  # tiny models; SD 1.5 shapes on a GPU
    .venv/bin/python -m bench.models --threads 1      # steadier on a shared CPU
"""

from __future__ import annotations

import os

# Before diffusers/huggingface_hub are imported: nothing here comes from the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel

from bench.common import environment, quiet_libraries
from bench.report import table, write_json
from bot.models import Catalog, LoraEntry, ModelEntry
from bot.pipelines import PipelineOptions, PipelineRunner, resolve_device
from bot.pipelines.loading import weights_bytes
from bot.pipelines.tiny import TINY_LORA, TINY_MODEL, TINY_SDXL, save_random_lora
from bot.requests import BatchKey, ImageSpec


@dataclass
class Setup:
    """Two models that alternate and a LoRA for the first, at one call's size and steps."""

    label: str
    catalog: Catalog
    side: int
    steps: int


def tiny_setup() -> Setup:
    catalog = Catalog(
        default="a",
        models={"a": ModelEntry("a", TINY_MODEL), "b": ModelEntry("b", TINY_SDXL)},
        loras={"l": LoraEntry("l", TINY_LORA, ("a",))},
    )
    return Setup("tiny (SD 1.x) / tiny-sdxl, tiny-lora", catalog, side=64, steps=4)


def sd15_setup(
    folder: Path, device: torch.device, dtype: torch.dtype, side: int, steps: int
) -> Setup:
    """Two SD 1.5-shaped models (different random weights) and a rank-16 LoRA, on disk."""
    from bench.gpu import save_sd15_pipeline, unet_config

    sources = {}
    for name in ("a", "b"):
        torch.manual_seed(ord(name))
        sources[name] = str(save_sd15_pipeline(folder / f"sd15-{name}", device, dtype))
    lora = save_random_lora(UNet2DConditionModel(**unet_config(small=False)), folder, rank=16)
    catalog = Catalog(
        default="a",
        models={name: ModelEntry(name, source) for name, source in sources.items()},
        loras={"l": LoraEntry("l", str(lora), ("a",))},
    )
    return Setup("SD 1.5 shapes ×2, rank-16 LoRA", catalog, side=side, steps=steps)


def seconds(work: Callable[[], Any], device: torch.device) -> float:
    start = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def unload(runner: PipelineRunner, keep: str) -> None:
    """Unload every model but `keep`, as `load` does for a model that does not fit beside."""
    runner.models.make_room(runner.models.budget, keep=keep)


def measure(setup: Setup, options: PipelineOptions, repeats: int) -> dict[str, Any]:
    """Median seconds of each switch and of a plain call, in one runner whose budget holds
    one of the two models."""
    sizes = [weights_bytes(entry.source, options) for entry in setup.catalog.models.values()]
    # Room for one model, not two (built-in models are built by now, outside the timings).
    budget = max(sizes) * 5 // 4
    runner = PipelineRunner(replace(options, memory_budget_bytes=budget), setup.catalog)
    device = runner.device
    spec = [ImageSpec("a lighthouse on a cliff at dusk", "", 1, guidance=7.5)]

    def call(model: str, loras: tuple[tuple[str, float], ...] = ()) -> None:
        key = BatchKey(model, "text", setup.side, setup.side, setup.steps, "Euler", loras=loras)
        runner.generate(key, spec)

    first_load = seconds(lambda: runner.load("a"), device)
    call("a")
    call("b")
    call("a")  # warm: kernels, allocator
    assert runner.resident_models() == {"a"}, "the budget should hold one model"
    unloads, loads = [], []
    for _ in range(repeats):
        for model in ("b", "a"):
            # The two halves of a switch, timed apart.
            unloads.append(seconds(lambda m=model: unload(runner, m), device))
            loads.append(seconds(lambda m=model: runner.load(m), device))
            call(model)
    lora = (("l", 1.0),)
    lora_first = seconds(lambda: call("a", lora), device)
    # Interleaved rounds, each call named by how its LoRA set differs from the call before.
    rounds: dict[str, list[float]] = {"off": [], "plain": [], "on": [], "same": [], "weight": []}
    for _ in range(repeats):
        for name, loras in (
            ("off", ()),
            ("plain", ()),
            ("on", lora),
            ("same", lora),
            ("weight", (("l", 0.5),)),
        ):
            rounds[name].append(seconds(lambda s=loras: call("a", s), device))
    # The switch alone, without a call: what `generate` does once before its call.
    sets = [lora, (("l", 0.5),), ()]
    use_loras = runner.models.use_loras
    switch = [seconds(lambda s=sets[n % 3]: use_loras("a", s), device) for n in range(30)]
    median = statistics.median
    return {
        "setup": setup.label,
        "call": f"{setup.side}×{setup.side}, {setup.steps} steps, 1 image",
        "model_bytes": max(sizes),
        "first_load_s": first_load,
        "unload_s": median(unloads),
        "load_after_unload_s": median(loads),
        "plain_call_s": median(rounds["plain"]),
        "lora_first_call_s": lora_first,
        "lora_on_call_s": median(rounds["on"]),
        "lora_same_set_call_s": median(rounds["same"]),
        "lora_weight_switched_call_s": median(rounds["weight"]),
        "lora_off_call_s": median(rounds["off"]),
        "lora_switch_alone_s": median(switch),
    }


def report(rows: list[dict[str, Any]]) -> None:
    lines = []
    for row in rows:
        call = row["plain_call_s"]
        for label, name in (
            ("first load from disk", "first_load_s"),
            ("switch: unload the resident model", "unload_s"),
            ("switch: load the other from disk", "load_after_unload_s"),
            ("call, no LoRA", "plain_call_s"),
            ("call, LoRA first used (loads it)", "lora_first_call_s"),
            ("call, LoRA switched on", "lora_on_call_s"),
            ("call, same LoRA set as before", "lora_same_set_call_s"),
            ("call, LoRA weight switched", "lora_weight_switched_call_s"),
            ("call, LoRA switched off", "lora_off_call_s"),
            ("LoRA set switched, no call", "lora_switch_alone_s"),
        ):
            lines.append((row["setup"], label, f"{row[name]:.4f}", f"{row[name] / call:.3f}"))
    print(table(["models", "what", "seconds", "× a call without LoRA"], lines))
    for row in rows:
        print(f"{row['setup']}: {row['model_bytes'] / 2**20:.1f} MiB per model; {row['call']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="as DEVICE")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, help="SD 1.5 shapes too")
    parser.add_argument("--full-size", type=int, default=512, help="SD 1.5 calls' side")
    parser.add_argument("--full-steps", type=int, default=20, help="SD 1.5 calls' steps")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=Path("bench/results/models.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quiet_libraries()
    device, dtype = resolve_device(args.device)
    full = device.type == "cuda" if args.full is None else args.full
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        options = PipelineOptions(device=args.device, cache_dir=Path(folder), safety_checker=False)
        setups = [tiny_setup()]
        if full:
            setups.append(sd15_setup(Path(folder), device, dtype, args.full_size, args.full_steps))
        for setup in setups:
            rows.append(measure(setup, options, args.repeats))
    report(rows)
    write_json(args.out, {"environment": environment(), "results": rows})


if __name__ == "__main__":
    main()
