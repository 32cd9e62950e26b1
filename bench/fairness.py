"""Fair share under a flood, and batch fill on a mixed burst: FIFO against our batch former.

A realistic mix of requests (sizes, steps, schedulers, counts, guidance values, variations at
several strengths) is replayed on a virtual clock with bench.mix's cost model of a diffusers
call. "FIFO" is the former this bot had before: oldest job first, filled with later jobs of
the same key, where guidance and img2img strength were part of the key. "Fair" is
bot.queue.QueueIndex: start-time fair queuing over members by cost, with guidance per image
and img2img jobs keyed by the steps they denoise.

Flood: one member sends half of all requests, the most expensive half, while light members
send the rest; arrivals are Poisson at `--load` of FIFO's batched capacity. Burst: every
request of a 32-job draw arrives at once (bench.gpu's mixed burst), over 100 draws. Thrash:
three members keep jobs of the mix queued on model a while a fourth keeps one cheap job queued
on model b, which does not fit beside a, on one worker holding one model at a time; run with
model switches free (the policy before) and charged to the member who makes them (ours), and
without the fourth member for reference. Pure Python, seconds to run.

    .venv/bin/python -m bench.fairness --jobs 2000 --load 1.1
"""

from __future__ import annotations

import argparse
import itertools
import random
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from bench.mix import CostModel, pick, sample_requests
from bench.report import percentile, print_goals, table, verdict, write_json
from bot.queue import QueueIndex
from bot.requests import GenerationRequest, Job

GUIDANCES = ((7.5, 50), (7.0, 15), (5.0, 10), (9.0, 10), (12.0, 5), (3.0, 5), (1.0, 5))
STRENGTHS = ((0.35, 35), (0.75, 35), (0.6, 15), (0.5, 10), (0.4, 5))
FLOODER = 0
LIGHT_MEMBERS = 200
GOAL_P95_GAIN = 5.0  # light members' p95 wait, FIFO over fair, at least
GOAL_THROUGHPUT = 0.05  # fair's throughput at most this much below FIFO's
GOAL_FILL_GAIN = 1.3  # images per call on the burst, fair over FIFO, at least
# Thrash: members 1-3 keep jobs queued on model a, THRASHER one cheap job on model b.
ON_A = (1, 2, 3)
THRASHER = 4
DEPTH = 3  # jobs each member on model a keeps queued
CHEAP = GenerationRequest(
    prompt="cheap", seed=1, steps=20, guidance=7.5, width=256, height=256,
    scheduler="Euler a", count=1, model="b",
)  # fmt: skip
GOAL_LOADS_SHARE = 1.1  # device time on loads, of the thrasher's fair share, at most
GOAL_OTHERS_KEEP = 0.9  # the others' units/min, of their fair share's (3/4 of theirs alone)


def realistic(requests: Sequence[GenerationRequest], rng: random.Random) -> list[GenerationRequest]:
    """The mix with what members really vary: guidance, and strengths besides the buttons'."""
    made = []
    for request in requests:
        changes: dict = {"guidance": pick(rng, GUIDANCES)}
        if request.mode == "image":
            changes["strength"] = pick(rng, STRENGTHS)
        made.append(replace(request, **changes))
    return made


def old_key(request: GenerationRequest) -> Hashable:
    """The batch key before guidance went per image: guidance and strength included."""
    return (request.batch_key, request.guidance, request.strength)


class FifoFormer:
    """The former this bot had: the oldest job, then later jobs of its key that fit."""

    def __init__(self, key: Callable[[GenerationRequest], Hashable] = old_key) -> None:
        self.pending: list[Job] = []
        self.key = key

    def add(self, job: Job) -> None:
        self.pending.append(job)

    def __len__(self) -> int:
        return len(self.pending)

    def take(self, cap: int) -> list[Job]:
        first = self.pending[0]
        key, batch, images = self.key(first.request), [first], first.request.count
        for job in self.pending[1:]:
            if images >= cap:
                break
            if self.key(job.request) == key and images + job.request.count <= cap:
                batch.append(job)
                images += job.request.count
        taken = {job.id for job in batch}
        self.pending = [job for job in self.pending if job.id not in taken]
        return batch


class FairFormer:
    """bot.queue.QueueIndex, claimed the way the executor claims from it."""

    def __init__(self) -> None:
        self.index = QueueIndex()

    def add(self, job: Job) -> None:
        self.index.add(job)

    def __len__(self) -> int:
        return len(self.index)

    def take(self, cap: int) -> list[Job]:
        batch = self.index.next_batch(lambda key: cap)
        self.index.claimed(batch)
        return batch


@dataclass
class Outcome:
    waits: dict[int, float]  # job id -> seconds from arrival to its call's start
    calls: int
    images: int
    busy: float
    makespan: float
    units: float


def replay(jobs: list[Job], former: FifoFormer | FairFormer, cap: int, cost: CostModel) -> Outcome:
    """One device draining the former as the executor does; calls over the cap run in slices."""
    clock = busy = 0.0
    upcoming = calls = images = 0
    waits: dict[int, float] = {}
    while upcoming < len(jobs) or len(former):
        if not len(former):
            clock = max(clock, jobs[upcoming].queued_at)
        while upcoming < len(jobs) and jobs[upcoming].queued_at <= clock:
            former.add(jobs[upcoming])
            upcoming += 1
        batch = former.take(cap)
        total = sum(job.request.count for job in batch)
        key = batch[0].request.batch_key
        slices = [min(cap, total - start) for start in range(0, total, cap)]
        seconds = sum(cost.call_seconds(key, n) for n in slices)
        for job in batch:
            waits[job.id] = clock - job.queued_at
        calls += len(slices)
        images += total
        clock += seconds
        busy += seconds
    units = sum(job.request.cost for job in jobs)
    return Outcome(waits, calls, images, busy, clock, units)


def flood_jobs(requests: list[GenerationRequest], rate: float, rng: random.Random) -> list[Job]:
    """Half of the requests, the most expensive, are the flooder's; all arrive as one Poisson
    stream, so the flooder's and the light members' requests interleave."""
    by_cost = sorted(range(len(requests)), key=lambda i: requests[i].cost, reverse=True)
    flooder = set(by_cost[: len(requests) // 2])
    clock, jobs = 0.0, []
    for i in rng.sample(range(len(requests)), len(requests)):
        clock += rng.expovariate(rate)
        member = FLOODER if i in flooder else 1 + rng.randrange(LIGHT_MEMBERS)
        jobs.append(Job(len(jobs) + 1, member, 1, 1, requests[i], queued_at=clock))
    return jobs


def summary(name: str, jobs: list[Job], outcome: Outcome, cap: int) -> dict:
    light = [outcome.waits[j.id] for j in jobs if j.member_id != FLOODER]
    flooder_images = sum(j.request.count for j in jobs if j.member_id == FLOODER)
    return {
        "former": name,
        "light_wait_p50_s": percentile(light, 50),
        "light_wait_p95_s": percentile(light, 95),
        "flooder_images_per_min": 60 * flooder_images / outcome.makespan,
        "units_per_min": 60 * outcome.units / outcome.makespan,
        "images_per_call": outcome.images / outcome.calls,
        "batch_fill": outcome.images / outcome.calls / cap,
        "busy_share": outcome.busy / outcome.makespan,
    }


def burst_fill(rng: random.Random, jobs: int, draws: int, cap: int, cost: CostModel) -> list[dict]:
    """Images per call when `jobs` requests of the mix arrive at once, one member each (as
    bench.gpu's mixed burst), summed over `draws` independent bursts so the figure is steady."""
    totals = {"FIFO (before)": [0, 0], "fair (ours)": [0, 0]}
    for _ in range(draws):
        requests = realistic(sample_requests(rng, jobs), rng)
        burst = [Job(i + 1, i, 1, 1, r, queued_at=0.0) for i, r in enumerate(requests)]
        for name, former in (("FIFO (before)", FifoFormer()), ("fair (ours)", FairFormer())):
            outcome = replay(burst, former, cap, cost)
            totals[name][0] += outcome.images
            totals[name][1] += outcome.calls
    return [
        {"former": name, "images_per_call": images / calls, "batch_fill": images / calls / cap}
        for name, (images, calls) in totals.items()
    ]


def fifo_capacity_per_second(requests: list[GenerationRequest], cap: int, cost: CostModel) -> float:
    """Jobs a second FIFO sustains when its queue is long: its burst makespan."""
    burst = [Job(i + 1, i, 1, 1, r, queued_at=0.0) for i, r in enumerate(requests)]
    return len(burst) / replay(burst, FifoFormer(), cap, cost).makespan


@dataclass
class Switching:
    """One worker's run under thrash: its model loads, and each member's waits and units."""

    loads: int = 0
    clock: float = 0.0
    waits: dict[int, list[float]] = field(default_factory=dict)
    units: dict[int, float] = field(default_factory=dict)


def replay_switches(
    index: QueueIndex, members: Sequence[int], args: argparse.Namespace, cost: CostModel
) -> Switching:
    """Members on model a keep DEPTH jobs of the mix queued, THRASHER (when among `members`)
    one cheap job on model b; one worker holding one model at a time claims as the executor
    does for `--thrash-minutes`, a switch taking `--load-seconds` before its call."""
    rng, ids = random.Random(args.seed), itertools.count(1)  # the same draws for every policy
    run, held, cap = Switching(), "a", args.max_batch_size
    while run.clock < args.thrash_minutes * 60:
        for member in members:
            while len(index.jobs_of(member)) < (1 if member == THRASHER else DEPTH):
                request = CHEAP if member == THRASHER else sample_requests(rng, 1, model="a")[0]
                index.add(Job(next(ids), member, 1, 1, request, queued_at=run.clock))
        resident = frozenset({held})
        batch = index.next_batch(lambda key: cap, resident)
        index.claimed(batch, resident)
        key = batch[0].request.batch_key
        if key.model != held:
            held, run.loads, run.clock = key.model, run.loads + 1, run.clock + args.load_seconds
        for job in batch:
            run.waits.setdefault(job.member_id, []).append(run.clock - job.queued_at)
            run.units[job.member_id] = run.units.get(job.member_id, 0.0) + job.request.cost
        total = sum(job.request.count for job in batch)
        run.clock += sum(cost.call_seconds(key, min(cap, total - s)) for s in range(0, total, cap))
    return run


def thrash_report(args: argparse.Namespace, cost: CostModel) -> dict:
    """Loads, and each member's wait and units per minute, in one run: without the thrasher,
    then with it, switches free (before) and charged to the member making them (ours)."""
    everyone = (*ON_A, THRASHER)
    runs = {
        "no thrasher": replay_switches(QueueIndex(), ON_A, args, cost),
        "switch free (before)": replay_switches(QueueIndex(switch_units=0.0), everyone, args, cost),
        "switch charged (ours)": replay_switches(QueueIndex(), everyone, args, cost),
    }
    policies, members = [], []
    for policy, run in runs.items():
        minutes = run.clock / 60
        others = [wait for member in ON_A for wait in run.waits[member]]
        policies.append(
            {
                "policy": policy,
                "loads": run.loads,
                "device_on_loads": run.loads * args.load_seconds / run.clock,
                "others_units_per_min": sum(run.units[member] for member in ON_A) / minutes,
                "others_wait_p50_s": percentile(others, 50),
                "thrasher_jobs": len(run.waits.get(THRASHER, [])),
            }
        )
        members += [
            {
                "policy": policy,
                "member": f"{member} on b (thrasher)" if member == THRASHER else f"{member} on a",
                "jobs": len(waits),
                "units_per_min": run.units[member] / minutes,
                "wait_p50_s": percentile(waits, 50),
                "wait_p95_s": percentile(waits, 95),
            }
            for member, waits in sorted(run.waits.items())
        ]
    return {"policies": policies, "members": members}


def print_thrash(args: argparse.Namespace, thrash: dict) -> dict[str, str]:
    """The thrash tables, each member's median wait ours over before, and the goal lines."""
    print(
        f"\nThrash: members 1-3 keep {DEPTH} jobs queued on model a, member {THRASHER} one "
        f"cheap job ({CHEAP.cost:g} units) on model b; a load takes {args.load_seconds:g} s; "
        f"{args.thrash_minutes:g} minutes"
    )
    for rows in (thrash["policies"], thrash["members"]):
        columns = list(rows[0])
        print(table(columns, [[_cell(column, row[column]) for column in columns] for row in rows]))
    alone, before, ours = thrash["policies"]
    wait = {(row["policy"], row["member"]): row["wait_p50_s"] for row in thrash["members"]}
    changes = []
    for policy, member in wait:
        if policy == ours["policy"]:
            was, now = wait[before["policy"], member], wait[policy, member]
            ratio = f" (×{now / was:.2f})" if was >= 0.01 else ""
            changes.append(f"{member} {was:.2f} s → {now:.2f} s{ratio}")
    print("\nMedian wait, switches free → charged: " + "; ".join(changes))
    fair = 1 / (len(ON_A) + 1)
    keep = ours["others_units_per_min"] / ((1 - fair) * alone["others_units_per_min"])
    fewer = before["loads"] / max(ours["loads"], 1)
    goals = {
        f"loads take at most {GOAL_LOADS_SHARE:g}× the thrasher's fair share of the device "
        f"({fair:.0%}): {ours['device_on_loads']:.0%} ({fewer:.1f}× fewer loads than "
        f"before, {before['device_on_loads']:.0%})": verdict(
            ours["device_on_loads"] <= GOAL_LOADS_SHARE * fair
        ),
        f"members on a keep {GOAL_OTHERS_KEEP:.0%} of their fair share's units/min "
        f"({keep:.0%}; before {before['others_units_per_min'] / alone['others_units_per_min']:.0%} "
        "of theirs without the thrasher)": verdict(keep >= GOAL_OTHERS_KEEP),
    }
    return print_goals(goals)


def _cell(column: str, value: object) -> str:
    if isinstance(value, str | int):
        return str(value)
    return f"{value:.0%}" if column == "device_on_loads" else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--load", type=float, default=1.1, help="of FIFO's batched capacity")
    parser.add_argument("--burst-jobs", type=int, default=32, help="as bench.gpu's burst")
    parser.add_argument("--burst-draws", type=int, default=100)
    parser.add_argument("--max-batch-size", type=int, default=8, help="as MAX_BATCH_SIZE")
    parser.add_argument("--thrash-minutes", type=float, default=30, help="of device time")
    parser.add_argument("--load-seconds", type=float, default=4.0, help="a model switch")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results/fairness.json"))
    args = parser.parse_args()

    rng = random.Random(args.seed)
    cost, cap = CostModel(), args.max_batch_size
    requests = realistic(sample_requests(rng, args.jobs), rng)
    rate = args.load * fifo_capacity_per_second(requests, cap, cost)
    flood = flood_jobs(requests, rate, rng)
    flooded = [
        summary("FIFO (before)", flood, replay(flood, FifoFormer(), cap, cost), cap),
        summary("fair (ours)", flood, replay(flood, FairFormer(), cap, cost), cap),
    ]
    bursts = burst_fill(rng, args.burst_jobs, args.burst_draws, cap, cost)
    columns = {
        "former": "{}",
        "light_wait_p50_s": "{:.1f}",
        "light_wait_p95_s": "{:.1f}",
        "flooder_images_per_min": "{:.1f}",
        "units_per_min": "{:.1f}",
        "images_per_call": "{:.2f}",
        "batch_fill": "{:.0%}",
        "busy_share": "{:.0%}",
    }
    print(
        f"{args.jobs} jobs at {rate * 60:.1f} jobs/min ({args.load:g} of FIFO's capacity); "
        f"MAX_BATCH_SIZE {cap}"
    )
    print("\nFlood: one member sends the most expensive half")
    print(table(list(columns), [[f.format(r[c]) for c, f in columns.items()] for r in flooded]))
    print(f"\nMixed burst: {args.burst_jobs} requests at once, {args.burst_draws} draws")
    fill = ("former", "images_per_call", "batch_fill")
    print(table(list(fill), [[columns[c].format(r[c]) for c in fill] for r in bursts]))
    goals = check_goals(flooded, bursts)
    thrash = thrash_report(args, cost)
    thrash_goals = print_thrash(args, thrash)
    write_json(
        args.out,
        {
            "settings": {**vars(args), "out": str(args.out)},
            "flood": flooded,
            "burst": bursts,
            "goals": goals,
            "thrash": thrash,
            "thrash_goals": thrash_goals,
        },
    )


def check_goals(flooded: list[dict], bursts: list[dict]) -> dict[str, str]:
    fifo, fair = flooded
    p95_gain = fifo["light_wait_p95_s"] / max(fair["light_wait_p95_s"], 1e-9)
    throughput = fair["units_per_min"] / fifo["units_per_min"]
    fill_gain = bursts[1]["images_per_call"] / bursts[0]["images_per_call"]
    goals = {
        f"light members' p95 wait {GOAL_P95_GAIN:g}× lower than FIFO under the flood "
        f"(×{p95_gain:.1f})": verdict(p95_gain >= GOAL_P95_GAIN),
        f"throughput within {GOAL_THROUGHPUT:.0%} of FIFO under the flood "
        f"({throughput:.1%} of FIFO)": verdict(throughput >= 1 - GOAL_THROUGHPUT),
        f"batch fill on the mixed burst {GOAL_FILL_GAIN:g}× FIFO's (×{fill_gain:.2f})": verdict(
            fill_gain >= GOAL_FILL_GAIN
        ),
    }
    return print_goals(goals)


if __name__ == "__main__":
    main()
