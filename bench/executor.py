"""What batching buys and what our executor costs, on the tiny model.

For N compatible jobs: (a) one diffusers call per job, (b) bare batched calls with the batches
the executor would form, (c) the real service: SQLite store, executor thread, PNG delivery.
(c)/(b) is our overhead, (a)/(c) is what batching buys. Runs are interleaved a, b, c, a, b, c
after a warm-up round, so drift in the machine hits all three alike.

    .venv/bin/python -m bench.executor --jobs 1,4,8,16 --repeats 3 --size 64 --steps 8
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import (
    Probe,
    StallMeter,
    bench_settings,
    environment,
    quiet_libraries,
    run_jobs,
    start_service,
)
from bench.report import print_goals, table, verdict, write_json
from bot.executor import Runner
from bot.queue import QueueIndex
from bot.requests import BatchKey, GenerationRequest, ImageSpec, Job, RawOptions

GOAL_JOBS = 8
GOAL_OVERHEAD = 1.10  # (c)/(b) at most
GOAL_SPEEDUP = 1.3  # (a)/(c) at least
GOAL_STALL = 0.250  # seconds


def executor_calls(
    requests: list[GenerationRequest], max_images: int
) -> list[tuple[BatchKey, list[ImageSpec]]]:
    """The calls the executor makes when all these jobs are queued at once: the queue's
    batches, sliced at the cap as the executor slices them."""
    queue = QueueIndex()
    queue.load(Job(i, i, None, None, r, queued_at=float(i)) for i, r in enumerate(requests))
    calls = []
    while batch := queue.next_batch(lambda key: max_images):
        queue.claimed(batch)
        specs = [spec for job in batch for spec in job.image_specs]
        key = batch[0].request.batch_key
        calls += [(key, specs[i : i + max_images]) for i in range(0, len(specs), max_images)]
    return calls


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def one_call_per_job(runner: Runner, requests: list[GenerationRequest]) -> None:
    for request in requests:
        for spec in Job(0, 0, None, None, request).image_specs:
            runner.generate(request.batch_key, [spec])


def bare_batched(runner: Runner, calls: list[tuple[BatchKey, list[ImageSpec]]]) -> None:
    for key, specs in calls:
        runner.generate(key, specs)


async def measure(args: argparse.Namespace) -> dict:
    quiet_libraries()
    job_counts = [int(n) for n in args.jobs.split(",")]
    rows, report = [], []
    with tempfile.TemporaryDirectory(prefix="bench-executor-") as tmp:
        settings = bench_settings(
            Path(tmp),
            model_id="tiny",
            device=args.device,
            overrides={"MAX_BATCH_SIZE": str(args.max_batch_size)},
        )
        probe = Probe(upload_seconds=args.upload_ms / 1000)
        service = await start_service(settings, probe)
        try:
            for n in job_counts:
                raws = [
                    RawOptions(
                        f"member {i}'s picture",
                        seed=1000 + i,
                        steps=args.steps,
                        width=args.size,
                        height=args.size,
                    )
                    for i in range(n)
                ]
                requests = [service.validate(raw) for raw in raws]
                calls = executor_calls(requests, args.max_batch_size)
                samples: dict[str, list[float]] = {"a": [], "b": [], "c": []}
                stalls, outside, c_batches = [], [], []
                for round_ in range(args.repeats + 1):  # round 0 warms up and is not kept
                    a = timed(lambda r=requests: one_call_per_job(service.runner, r))
                    b = timed(lambda c=calls: bare_batched(service.runner, c))
                    async with StallMeter() as meter:
                        run = await run_jobs(service, probe, raws)
                    if round_:
                        samples["a"].append(a)
                        samples["b"].append(b)
                        samples["c"].append(run.seconds)
                        stalls.append(meter.longest)
                        outside.append(run.seconds - run.in_calls)
                        c_batches.append(len(run.batch_sizes))
                med = {k: statistics.median(v) for k, v in samples.items()}
                entry = {
                    "jobs": n,
                    "calls_b": len(calls),
                    "batches_c": c_batches,
                    "seconds": samples,
                    "median": med,
                    "overhead_c_over_b": med["c"] / med["b"],
                    "speedup_a_over_c": med["a"] / med["c"],
                    "c_outside_calls_median_s": statistics.median(outside),
                    "max_stall_s": max(stalls),
                }
                report.append(entry)
                rows.append(
                    [
                        n,
                        f"{len(calls)} / {max(c_batches)}",
                        f"{med['a']:.3f}",
                        f"{med['b']:.3f}",
                        f"{med['c']:.3f}",
                        f"{entry['overhead_c_over_b']:.3f}",
                        f"{entry['speedup_a_over_c']:.3f}",
                        f"{entry['c_outside_calls_median_s'] * 1000:.0f}",
                        f"{max(stalls) * 1000:.0f}",
                    ]
                )
                print(f"{n} jobs done", flush=True)
        finally:
            await service.close()
    print(
        f"\ntiny model, {args.size}×{args.size}, {args.steps} steps, MAX_BATCH_SIZE "
        f"{args.max_batch_size}, device {args.device} ({torch.get_num_threads()} torch threads), "
        f"upload {args.upload_ms:g} ms per job; "
        f"median of {args.repeats} interleaved runs"
    )
    print(
        table(
            [
                "jobs",
                "calls (b) / (c)",
                "(a) s",
                "(b) s",
                "(c) s",
                "(c)/(b)",
                "(a)/(c)",
                "(c) outside calls ms",
                "max tick gap ms",
            ],
            rows,
        )
    )
    return {
        "settings": {**vars(args), "out": str(args.out)},
        "environment": environment(),
        "results": report,
        "goals": check_goals(report),
    }


def check_goals(report: list[dict]) -> dict[str, str]:
    """PASS/FAIL against the issue's goals; a goal whose job count was not run says so."""
    at_goal = next((e for e in report if e["jobs"] == GOAL_JOBS), None)
    overhead = speedup = "not run"
    if at_goal is not None:
        overhead = verdict(at_goal["overhead_c_over_b"] <= GOAL_OVERHEAD)
        speedup = verdict(at_goal["speedup_a_over_c"] >= GOAL_SPEEDUP)
    goals = {
        f"(c)/(b) <= {GOAL_OVERHEAD} at {GOAL_JOBS} jobs": overhead,
        f"(a)/(c) >= {GOAL_SPEEDUP} at {GOAL_JOBS} jobs": speedup,
        f"max stall < {GOAL_STALL * 1000:.0f} ms": verdict(
            max(e["max_stall_s"] for e in report) < GOAL_STALL
        ),
    }
    return print_goals(goals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="1,4,8,16", help="job counts, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds after warm-up")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8, help="as MAX_BATCH_SIZE")
    parser.add_argument("--device", default="cpu", help="as DEVICE")
    parser.add_argument(
        "--upload-ms",
        type=float,
        default=0.0,
        help="time the stand-in cog waits per job after encoding, as the real one waits on its "
        "Discord upload",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads; 1 keeps timings steady when other processes share the cores",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/executor.json"))
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    write_json(args.out, asyncio.run(measure(args)))


if __name__ == "__main__":
    main()
