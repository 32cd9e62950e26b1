"""How well a realistic mix of requests batches, and what other grouping policies would save.

Poisson arrivals of a realistic request mix are replayed against the real batch former
(bot.queue.QueueIndex) on a virtual clock. A diffusers call on a batch of n images of one
key costs steps · (per_step + per_image_step · n · pixels/512²) + per_image_decode · n ·
pixels/512² seconds; img2img runs int(steps · strength) steps, as diffusers does. Policies:
FIFO one job per call (MAX_BATCH_SIZE=1), ours, ours with steps snapped to a grid, and ours
with a wait window: when the device is idle, hold the call until the oldest pending job is W
old or its batch is full. Pure Python: no torch import, seconds to run.

    .venv/bin/python -m bench.mix --loads 0.3,0.6,0.9,1.2,1.5 --windows 50,200,500
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench.report import percentile, table, write_json
from bot.queue import QueueIndex
from bot.requests import BatchKey, GenerationRequest, Job

# (value, weight): 70 % 512×512, 15 % 768×512, 10 % 512×768, 5 % 1024×1024, as width × height.
SIZES = (((512, 512), 70), ((768, 512), 15), ((512, 768), 10), ((1024, 1024), 5))
STEPS = ((25, 70), (20, 10), (30, 15), (50, 5))
SCHEDULERS = (("DPM++ 2M", 85), ("Euler a", 15))
COUNTS = ((1, 85), (4, 15))
STRENGTHS = (0.35, 0.75)
IMG2IMG_SHARE = 0.20

# From the named facts: one 512×512 image costs 1.6065 TFLOP per step with guidance and 2.54
# TFLOP besides (VAE decode, text encoder); at an assumed 40 % of an H100's 989 TFLOP/s.
ASSUMED_TFLOPS = 0.40 * 989
PER_IMAGE_STEP = 1.6065 / ASSUMED_TFLOPS
PER_IMAGE_DECODE = 2.54 / ASSUMED_TFLOPS
PER_STEP = 0.015  # assumed: a step's fixed cost (launches, scheduler) whatever the batch size


def pick(rng: random.Random, choices: Sequence[tuple]) -> object:
    values, weights = zip(*choices, strict=True)
    return rng.choices(values, weights)[0]


def sample_requests(
    rng: random.Random, n: int, *, model: str = "sd15", img2img_share: float = IMG2IMG_SHARE
) -> list[GenerationRequest]:
    """Requests drawn from the mix; shared with bench.gpu, which runs them for real."""
    requests = []
    for i in range(n):
        width, height = pick(rng, SIZES)
        image = rng.random() < img2img_share
        requests.append(
            GenerationRequest(
                prompt=f"request {i}",
                seed=rng.randrange(2**31),
                steps=pick(rng, STEPS),
                guidance=7.5,
                width=width,
                height=height,
                scheduler=pick(rng, SCHEDULERS),
                count=pick(rng, COUNTS),
                model=model,
                mode="image" if image else "text",
                strength=rng.choice(STRENGTHS) if image else None,
            )
        )
    return requests


@dataclass(frozen=True)
class CostModel:
    """Seconds one diffusers call takes, by its key and number of images."""

    per_step: float = PER_STEP
    per_image_step: float = PER_IMAGE_STEP
    per_image_decode: float = PER_IMAGE_DECODE

    def call_seconds(self, key: BatchKey, images: int) -> float:
        pixels = images * key.width * key.height / 512**2
        decode = self.per_image_decode * pixels
        # Without classifier-free guidance the UNet runs one sample per image instead of two.
        per_image_step = self.per_image_step if key.cfg else self.per_image_step / 2
        return key.denoising_steps * (self.per_step + per_image_step * pixels) + decode


@dataclass(frozen=True)
class Policy:
    name: str
    max_images: int
    window: float = 0.0
    snap_steps: tuple[int, ...] = ()


def snapped(request: GenerationRequest, grid: tuple[int, ...]) -> GenerationRequest:
    """The request with its steps moved to the nearest grid value (what that policy runs)."""
    if not grid:
        return request
    return replace(request, steps=min(grid, key=lambda s: (abs(s - request.steps), s)))


def simulate(
    requests: list[GenerationRequest], arrivals: list[float], policy: Policy, cost: CostModel
) -> dict:
    """Replay the arrivals against the queue's former with one device; calls above the cap run in
    slices, as the executor runs them."""
    jobs = [
        Job(i, i, None, None, snapped(r, policy.snap_steps), queued_at=t)
        for i, (r, t) in enumerate(zip(requests, arrivals, strict=True))
    ]
    pending = QueueIndex()
    cap = policy.max_images
    clock = busy = 0.0
    upcoming = calls = 0
    waits, latencies = [], []

    def admit(until: float) -> None:
        nonlocal upcoming
        while upcoming < len(jobs) and jobs[upcoming].queued_at <= until:
            pending.add(jobs[upcoming])
            upcoming += 1

    def images(batch: list[Job]) -> int:
        return sum(job.request.count for job in batch)

    while upcoming < len(jobs) or pending:
        if not pending:
            clock = max(clock, jobs[upcoming].queued_at)
        admit(clock)
        deadline = pending.next_batch(lambda key: cap)[0].queued_at + policy.window
        while clock < deadline and images(pending.next_batch(lambda key: cap)) < cap:
            if upcoming < len(jobs) and jobs[upcoming].queued_at <= deadline:
                clock = jobs[upcoming].queued_at
                admit(clock)
            else:
                clock = deadline
        batch = pending.next_batch(lambda key: cap)
        pending.claimed(batch)
        key, total = batch[0].request.batch_key, images(batch)
        slices = [min(cap, total - start) for start in range(0, total, cap)]
        seconds = sum(cost.call_seconds(key, n) for n in slices)
        calls += len(slices)
        waits += [clock - job.queued_at for job in batch]
        latencies += [clock + seconds - job.queued_at for job in batch]
        clock += seconds
        busy += seconds
    total_images = sum(r.count for r in requests)
    return {
        "policy": policy.name,
        "calls": calls,
        "images_per_call": total_images / calls,
        "wait_p50_s": percentile(waits, 50),
        "wait_p95_s": percentile(waits, 95),
        "latency_p95_s": percentile(latencies, 95),
        "busy_share": busy / clock,
    }


def batch1_seconds_per_job(requests: list[GenerationRequest], cost: CostModel) -> float:
    """Mean device time per job when every image runs alone: the FIFO batch-1 capacity."""
    return sum(cost.call_seconds(r.batch_key, 1) * r.count for r in requests) / len(requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per load")
    parser.add_argument(
        "--loads",
        default="0.3,0.6,0.9,1.2,1.5",
        help="arrival rates as fractions of the FIFO batch-1 capacity",
    )
    parser.add_argument("--max-batch-size", type=int, default=8, help="as MAX_BATCH_SIZE")
    parser.add_argument("--windows", default="50,200,500", help="wait windows to try, in ms")
    parser.add_argument("--snap-steps", default="20,25,30", help="step grid for that policy")
    parser.add_argument("--per-step", type=float, default=PER_STEP, help="seconds")
    parser.add_argument("--per-image-step", type=float, default=PER_IMAGE_STEP, help="seconds")
    parser.add_argument("--per-image-decode", type=float, default=PER_IMAGE_DECODE, help="s")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/mix.json"))
    args = parser.parse_args()

    cost = CostModel(args.per_step, args.per_image_step, args.per_image_decode)
    grid = tuple(int(s) for s in args.snap_steps.split(","))
    policies = [
        Policy("FIFO, MAX_BATCH_SIZE=1", 1),
        Policy("ours", args.max_batch_size),
        Policy(f"ours + steps to {{{args.snap_steps}}}", args.max_batch_size, snap_steps=grid),
        *(
            Policy(f"ours + wait {w} ms", args.max_batch_size, window=int(w) / 1000)
            for w in args.windows.split(",")
        ),
    ]
    rng = random.Random(args.seed)
    requests = sample_requests(rng, args.jobs)
    per_job = batch1_seconds_per_job(requests, cost)
    print(
        f"{args.jobs} jobs, {sum(r.count for r in requests)} images; cost model per_step "
        f"{cost.per_step * 1000:.1f} ms, per_image_step {cost.per_image_step * 1000:.2f} ms, "
        f"per_image_decode {cost.per_image_decode * 1000:.2f} ms; FIFO batch-1 capacity "
        f"{60 / per_job:.1f} jobs/min"
    )
    report = []
    for load in (float(x) for x in args.loads.split(",")):
        rate = load / per_job
        clock, arrivals = 0.0, []
        for _ in requests:
            clock += rng.expovariate(rate)
            arrivals.append(clock)
        results = [simulate(requests, arrivals, p, cost) for p in policies]
        ours = results[1]["calls"]
        report.append({"load": load, "jobs_per_min": rate * 60, "results": results})
        print(f"\nload {load:g} of FIFO batch-1 capacity ({rate * 60:.1f} jobs/min)")
        print(
            table(
                [
                    "policy",
                    "calls",
                    "calls saved vs ours",
                    "images/call",
                    "wait p50 s",
                    "wait p95 s",
                    "latency p95 s",
                    "device busy",
                ],
                [
                    [
                        r["policy"],
                        r["calls"],
                        ours - r["calls"],
                        f"{r['images_per_call']:.2f}",
                        f"{r['wait_p50_s']:.2f}",
                        f"{r['wait_p95_s']:.2f}",
                        f"{r['latency_p95_s']:.2f}",
                        f"{r['busy_share']:.0%}",
                    ]
                    for r in results
                ],
            )
        )
    write_json(
        args.out,
        {
            "settings": {**vars(args), "out": str(args.out)},
            "cost_model": asdict(cost),
            "batch1_seconds_per_job": per_job,
            "loads": report,
        },
    )


if __name__ == "__main__":
    main()
