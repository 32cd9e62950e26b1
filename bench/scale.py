"""Scaling out: the mixed burst through the local executor and through 1 and 2 Ray workers.

The burst is bench.gpu's (sizes, steps, schedulers, counts and image-to-image from bench.mix),
shrunk so the tiny model runs it on a CPU. Each setup is the bot as `python -m bot`
wires it (store, executor, delivery stand-in), with EXECUTOR=local or EXECUTOR=ray and
RAY_WORKERS=1 or 2 CPU workers, one core and one torch thread each; the local executor also runs
torch on one thread, so "Ray with one worker" against it is Ray's overhead alone. All three stay
up side by side and run in turn, after a warm-up burst each, so drift in the machine hits all
alike; while one runs, the others' idle actors are paused. Prints images/s, the scaling from
one to two workers and Ray's overhead.

    .venv/bin/python -m bench.scale --jobs 24 --rounds 3
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import asyncio
import contextlib
import random
import signal
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import PIL.Image
import ray
import torch

from bench.common import Probe, bench_settings, environment, quiet_libraries, run_jobs
from bench.common import start_service as start_bot
from bench.executor import executor_calls
from bench.gpu import as_raw, upload_for
from bench.mix import sample_requests
from bench.report import print_goals, table, verdict, write_json
from bot.pipelines import PipelineOptions
from bot.ray_cluster import connect_ray
from bot.ray_workers import DeviceHost
from bot.requests import GenerationRequest
from bot.workers import Call


def shrunk(request: GenerationRequest, steps_divisor: int = 2) -> GenerationRequest:
    """Sides a quarter and steps a half (or `steps_divisor`): the tiny model's calls then take
    long enough (tenths of a second) that the device's work, not the bot's bookkeeping, decides
    the rate. On a GPU a call takes seconds and the bookkeeping milliseconds."""
    return replace(
        request,
        width=request.width // 4,
        height=request.height // 4,
        steps=max(1, request.steps // steps_divisor),
    )


GOAL_SCALING = 1.8  # 2 workers over 1, at least
GOAL_OVERHEAD = 1.10  # local over Ray with 1 worker, in images/s, at most

SETUPS = {
    "local": {"EXECUTOR": "local"},
    "ray, 1 worker": {"EXECUTOR": "ray", "RAY_WORKERS": "1"},
    "ray, 2 workers": {"EXECUTOR": "ray", "RAY_WORKERS": "2"},
}


# The same diffusers calls sent straight to 1 and 2 Ray actors, without the bot: what the
# machine itself gives two workers at the moment (other processes share its cores).
BARE = {"bare, 1 actor": 1, "bare, 2 actors": 2}


def bare_calls(burst: list[GenerationRequest], max_images: int) -> list[Call]:
    """The calls our executor makes for the burst, with a stand-in init image where needed."""
    calls = []
    for key, specs in executor_calls(burst, max_images):
        if key.mode == "image":
            init = PIL.Image.new("RGB", (key.width, key.height), (128, 96, 64))
            specs = [replace(spec, init_image=init) for spec in specs]
        calls.append(Call(key, specs, [0] * len(specs)))
    return calls


def bare_hosts(cache: Path) -> tuple[list[Any], list[int]]:
    """Two bare actors with the tiny model loaded, and their process ids."""
    host = ray.remote(DeviceHost).options(num_cpus=1, max_concurrency=3)
    options = PipelineOptions(device="cpu", cache_dir=cache, safety_checker=False)
    hosts = [host.remote(options, None, ("tiny",)) for _ in range(2)]
    pids = [pid for pid, _ in ray.get([h.ready.remote() for h in hosts])]
    return hosts, pids


def run_bare(hosts: list[Any], calls: list[Call]) -> float:
    """Seconds to run every call, each actor taking the next call as soon as it is free."""
    started = time.perf_counter()
    waiting = list(calls)
    running = {h.generate.remote(waiting.pop(0), 0, 0): h for h in hosts if waiting}
    while running:
        [done], _ = ray.wait(list(running))
        host = running.pop(done)
        ray.get(done)
        if waiting:
            running[host.generate.remote(waiting.pop(0), 0, 0)] = host
    return time.perf_counter() - started


def worker_pids(service: Any) -> list[int]:
    """The process ids of a bot's Ray workers (none for the local executor)."""
    return [lane.worker.pid for lane in service.executor.lanes if getattr(lane.worker, "pid", 0)]


@contextlib.contextmanager
def paused(pids: list[int]) -> Iterator[None]:
    """The other setups' idle actors stopped while one setup runs. An idle Ray actor still
    takes about 1 % of a core for its own upkeep; on two cores, the two-worker setup would pay
    for the three (one bot's worker, two bare actors) that a real two-worker bot does not have."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def cpu_seconds(pid: int | str = "self") -> float:
    """CPU time a process has used (user and system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all cores have spent on anything but idling and waiting for disks."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_split(service: Any) -> dict[str, float]:
    """CPU seconds so far of the setup's Ray workers, of this process (the bot: its event
    loop, SQLite, PNG encoding, and the local executor's torch thread) and of the machine."""
    return {
        "workers": sum(cpu_seconds(pid) for pid in worker_pids(service)),
        "bot": cpu_seconds(),
        "machine": machine_busy_seconds(),
    }


def busy_seconds(service: Any) -> dict[str, float]:
    return {
        dict(labels)["worker"]: value
        for (name, labels), value in service.metrics.samples().items()
        if name == "imagine_worker_busy_seconds_total"
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    quiet_libraries()
    torch.set_num_threads(1)  # the local executor's torch, like each Ray worker's
    # Logical CPUs for every worker to stay up side by side (1 + 2 for the bots, 2 bare); only
    # one setup runs at a time, so at most two of them compute at once.
    connect_ray(None, 5)  # closed as the bot's own: loopback, token, no secrets in Ray
    rng = random.Random(args.seed)
    burst = [shrunk(r, args.steps_divisor) for r in sample_requests(rng, args.jobs, model="tiny")]
    raws = [as_raw(r) for r in burst]
    uploads = [upload_for(r, rng) for r in burst]
    images_per_burst = sum(r.count for r in burst)
    rates: dict[str, list[float]] = {name: [] for name in [*SETUPS, *BARE]}
    busy: dict[str, dict[str, float]] = {name: {} for name in SETUPS}
    cpu: dict[str, dict[str, float]] = {name: {} for name in SETUPS}
    ran: dict[str, float] = dict.fromkeys(SETUPS, 0.0)
    services: dict[str, tuple[Any, Probe]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        try:
            for index, (name, overrides) in enumerate(SETUPS.items()):
                settings = bench_settings(
                    Path(tmp) / f"run-{index}",
                    model_id="tiny",
                    device="cpu",
                    overrides={
                        "MAX_BATCH_SIZE": str(args.max_batch_size),
                        "DEFAULT_WIDTH": "128",  # uploads are fitted to the default area
                        "DEFAULT_HEIGHT": "128",
                        **overrides,
                    },
                )
                probe = Probe()
                service = await start_bot(settings, probe)
                services[name] = (service, probe)
                await run_jobs(service, probe, raws, None, uploads)  # warm-up, workers opened
                print(f"{name}: up and warm", flush=True)
            calls = bare_calls(burst, args.max_batch_size)
            hosts, bare_pids = bare_hosts(Path(tmp) / "run-0" / "models")
            for round_ in range(args.rounds):
                for name, (service, probe) in services.items():
                    others = [pid for other, (s, _) in services.items() if other != name
                              for pid in worker_pids(s)]  # fmt: skip
                    before, cpu_before = busy_seconds(service), cpu_split(service)
                    with paused(others + bare_pids):
                        run = await run_jobs(service, probe, raws, None, uploads)
                    for part, seconds in cpu_split(service).items():
                        spent = seconds - cpu_before[part]
                        cpu[name][part] = cpu[name].get(part, 0.0) + spent
                    rates[name].append(images_per_burst / run.seconds)
                    ran[name] += run.seconds
                    for worker, seconds in busy_seconds(service).items():
                        spent = seconds - before.get(worker, 0.0)
                        busy[name][worker] = busy[name].get(worker, 0.0) + spent
                bots = [pid for service, _ in services.values() for pid in worker_pids(service)]
                for name, count in BARE.items():
                    with paused(bots + bare_pids[count:]):
                        seconds = await asyncio.to_thread(run_bare, hosts[:count], calls)
                    rates[name].append(images_per_burst / seconds)
                print(f"round {round_ + 1} done", flush=True)
        finally:
            for service, _ in services.values():
                await service.close()
            ray.shutdown()
    medians = {name: statistics.median(taken) for name, taken in rates.items()}
    scaling = medians["ray, 2 workers"] / medians["ray, 1 worker"]
    # One and two workers run one after the other in each round, so their ratio in a round
    # cancels the machine's slower drift; how far it spreads shows the noise left.
    pairs = zip(rates["ray, 1 worker"], rates["ray, 2 workers"], strict=True)
    per_round = [two / one for one, two in pairs]
    ceiling = medians["bare, 2 actors"] / medians["bare, 1 actor"]
    overhead = medians["local"] / medians["ray, 1 worker"]
    shares = {
        name: {worker: seconds / ran[name] for worker, seconds in sorted(busy[name].items())}
        for name in SETUPS
    }
    # Of the machine's cores during each setup's rounds: Ray workers, the bot process, and the
    # rest (Ray's daemons, idle actors, anything else on the machine); as cores, 1.0 being one.
    cores = {
        name: {
            "workers": parts["workers"] / ran[name],
            "bot": parts["bot"] / ran[name],
            "rest": (parts["machine"] - parts["workers"] - parts["bot"]) / ran[name],
        }
        for name, parts in cpu.items()
    }
    print(
        f"\ntiny model, the mixed burst of {args.jobs} jobs ({images_per_burst} images), sides "
        f"a quarter and steps 1/{args.steps_divisor} of bench.mix's, MAX_BATCH_SIZE "
        f"{args.max_batch_size}, "
        f"one torch thread per worker, {os.cpu_count()} cores; median of {args.rounds} "
        "interleaved rounds"
    )
    print(
        table(
            ["setup", "images/s (median)", "rounds", "workers busy", "cores: workers, bot, rest"],
            [
                [
                    name,
                    f"{medians[name]:.2f}",
                    " ".join(f"{r:.2f}" for r in rates[name]),
                    ", ".join(f"{w} {s:.0%}" for w, s in shares.get(name, {}).items()) or "-",
                    ", ".join(f"{c:.2f}" for c in cores[name].values()) if name in cores else "-",
                ]
                for name in rates
            ],
        )
    )
    print(f"\nscaling 1 -> 2 Ray workers: {scaling:.2f}x (the same calls on bare actors, the "
          f"machine's own ceiling now: {ceiling:.2f}x); local over Ray with 1 worker: "
          f"{overhead:.3f}")  # fmt: skip
    print("scaling in each round: " + " ".join(f"{ratio:.2f}x" for ratio in per_round))
    goals = print_goals(
        {
            f"2 Ray workers / 1 >= {GOAL_SCALING}x": verdict(scaling >= GOAL_SCALING),
            f"local / Ray with 1 worker <= {GOAL_OVERHEAD}": verdict(overhead <= GOAL_OVERHEAD),
        }
    )
    return {
        "settings": {**vars(args), "out": str(args.out)},
        "environment": environment(),
        "images_per_burst": images_per_burst,
        "images_per_second": rates,
        "median": medians,
        "scaling": scaling,
        "scaling_per_round": per_round,
        "bare_scaling": ceiling,
        "busy_share": shares,
        "cores_used": cores,
        "overhead": overhead,
        "goals": goals,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=24, help="jobs in the burst")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after warm-up")
    parser.add_argument("--max-batch-size", type=int, default=8, help="as MAX_BATCH_SIZE")
    parser.add_argument("--seed", type=int, default=1, help="of the burst's random mix")
    parser.add_argument(
        "--steps-divisor", type=int, default=2, help="bench.mix's steps divided by this"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/scale.json"))
    args = parser.parse_args()
    write_json(args.out, asyncio.run(measure(args)))


if __name__ == "__main__":
    main()
