"""A long backlog: admission, claim, cancel, a member's place and a status refresh at 1,000,
10,000 and 100,000 queued jobs, and the event loop's longest stall while 1,000 admissions
arrive into the largest backlog. Goals: every operation at the largest size within 3× its
time at the smallest, none over 20 ms at the largest, the stall under 100 ms.

The service is wired as `python -m bot` wires it (SQLite store, queue index, the tiny model's
tokenizer) with the executor held back, so the queue only grows. Filling goes through the
store's own insert in one transaction; every timed operation goes through the service.

    .venv/bin/python -m bench.queue --sizes 1000,10000,100000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench.common import StallMeter, bench_settings, environment, quiet_libraries
from bench.report import print_goals, table, verdict, write_json
from bot.__main__ import open_service
from bot.db import Tx, jobs
from bot.intake import Intake
from bot.requests import GenerationRequest, RawOptions
from bot.service import ImagineService
from cogs.status import Status, StatusBoard

GOAL_GROWTH = 3.0  # largest-size time over smallest-size time, at most
GOAL_MS = 20.0  # per operation at the largest size, at most
GOAL_STALL_MS = 100.0
GOAL_RESTART_S = 1.0  # index rebuilt and first batch claimed, with 10,000 queued
MEMBERS_PER_JOB = 0.3  # many members: about three jobs each
SIDES = (256, 384, 512)
STEPS = (10, 15, 20, 25, 30)
OPERATIONS = ("admission", "claim", "cancel", "position", "status refresh")


def request_for(service: ImagineService, rng: random.Random) -> GenerationRequest:
    """One of 15 batch keys (3 sizes × 5 step counts), as a validated request."""
    side = rng.choice(SIDES)
    raw = RawOptions(
        prompt="a lighthouse at dusk",
        seed=rng.randint(0, 9999),
        steps=rng.choice(STEPS),
        width=side,
        height=side,
    )
    return service.validate(raw)


async def fill_to(service: ImagineService, size: int, rng: random.Random) -> None:
    """Queue jobs until `size` are waiting: the store's insert in one transaction, then the
    index reloaded, as at a start-up with that backlog."""
    missing = size - len(service.queue)
    members = max(1, int(size * MEMBERS_PER_JOB))
    made = [request_for(service, rng) for _ in range(missing)]

    async def insert_all(tx: Tx) -> None:
        for request in made:
            source = Intake(rng.randrange(members), 1, 1)
            await jobs.insert(tx, request, source)

    await service.store.write(insert_all)
    await service.executor.reload_queue()


async def timed(work: Callable[[], Awaitable[object]], rounds: int) -> float:
    """Median milliseconds of `rounds` runs of `work`."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        await work()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def measure_at(
    service: ImagineService, board: StatusBoard, rng: random.Random, rounds: int
) -> dict[str, float]:
    members = max(1, int(len(service.queue) * MEMBERS_PER_JOB))

    async def admit() -> None:
        await service.submit(request_for(service, rng), Intake(rng.randrange(members), 1, 1))

    # Jobs anywhere in the queue, picked before the clock runs.
    offsets = rng.sample(range(len(service.queue)), 2 * rounds)
    picks = [service.queue.page(offset, 1)[0].id for offset in offsets]
    to_cancel, to_place = iter(picks[:rounds]), iter(picks[rounds:])

    async def cancel() -> None:
        await service.cancel(next(to_cancel))

    async def position() -> None:
        await service.queue_estimates([next(to_place)])

    # The board shows the newest 1,000 jobs, as if they had all come from Discord.
    board.statuses.clear()
    board._turns.clear()
    for job in service.queue.page(max(0, len(service.queue) - 1000), 1000):
        board.track(Status(job.id, job.member_id, None, 0.0, f"Queued as job #{job.id}"))

    async def restart() -> None:
        """What a start-up does with the backlog: the index rebuilt, the first call claimed."""
        await service.executor.reload_queue()
        await service.executor.claim_next()

    results = {
        "restart": await timed(restart, 3),
        "admission": await timed(admit, rounds),
        "claim": await timed(service.executor.claim_next, rounds),
        "cancel": await timed(cancel, rounds),
        "position": await timed(position, rounds),
        "status refresh": await timed(board.refresh_queue, rounds),
    }
    return results


async def stall_during_admissions(
    service: ImagineService, board: StatusBoard, rng: random.Random, arrivals: int
) -> float:
    """Longest event-loop stall while `arrivals` admissions come in at once, with the status
    board ticking as in production."""
    members = max(1, int(len(service.queue) * MEMBERS_PER_JOB))
    board.start()
    try:
        async with StallMeter(interval=0.005) as meter:
            await asyncio.gather(
                *(
                    service.submit(
                        request_for(service, rng),
                        Intake(rng.randrange(members), 1, 1),
                    )
                    for _ in range(arrivals)
                )
            )
            await asyncio.sleep(1.0)  # two ticks of the board after the burst
    finally:
        await board.stop()
    return meter.longest * 1000


async def measure(args: argparse.Namespace) -> dict:
    sizes = sorted(int(size) for size in args.sizes.split(","))
    rng = random.Random(11)
    with tempfile.TemporaryDirectory() as folder:
        settings = bench_settings(
            Path(folder),
            model_id="tiny",
            device="cpu",
            overrides={"MAX_QUEUED_PER_MEMBER": "0", "MAX_REQUEST_COST": "100"},
        )
        service = await open_service(settings)
        await service.load_model()
        board = StatusBoard(service)
        report = []
        try:
            for size in sizes:
                started = time.perf_counter()
                await fill_to(service, size, rng)
                filled = time.perf_counter() - started
                results = await measure_at(service, board, rng, args.rounds)
                report.append(
                    {
                        "queued": size,
                        "fill_s": round(filled, 1),
                        **{k: round(v, 3) for k, v in results.items()},
                    }
                )
                print(
                    f"{size} queued (filled in {filled:.1f} s): "
                    + ", ".join(f"{k} {v:.2f} ms" for k, v in results.items()),
                    flush=True,
                )
            stall = await stall_during_admissions(service, board, rng, args.arrivals)
        finally:  # the executor was never started: only the store to close
            await service.store.close()
    print()
    print(
        table(
            ["queued", *[f"{op} (ms)" for op in ("restart", *OPERATIONS)]],
            [[e["queued"], *[f"{e[op]:.2f}" for op in ("restart", *OPERATIONS)]] for e in report],
        )
    )
    print(
        f"\nlongest event-loop stall while {args.arrivals} admissions arrived into "
        f"{sizes[-1]} queued: {stall:.1f} ms"
    )
    return {
        "settings": {**vars(args), "out": str(args.out)},
        "environment": environment(),
        "results": report,
        "stall_ms": round(stall, 1),
        "goals": check_goals(report, stall, args.arrivals),
    }


def check_goals(report: list[dict], stall: float, arrivals: int) -> dict[str, str]:
    smallest, largest = report[0], report[-1]
    goals = {}
    for op in OPERATIONS:
        growth = largest[op] / max(smallest[op], 1e-6)
        goals[
            f"{op}: {largest['queued']} queued within {GOAL_GROWTH:g}× of "
            f"{smallest['queued']} (×{growth:.2f})"
        ] = verdict(growth <= GOAL_GROWTH)
        goals[
            f"{op}: under {GOAL_MS:g} ms at {largest['queued']} queued ({largest[op]:.2f} ms)"
        ] = verdict(largest[op] <= GOAL_MS)
    at_10k = next((e for e in report if e["queued"] == 10_000), None)
    if at_10k is not None:
        seconds = at_10k["restart"] / 1000
        goals[
            f"restart with 10000 queued: index rebuilt and first batch claimed within "
            f"{GOAL_RESTART_S:g} s ({seconds:.2f} s)"
        ] = verdict(seconds <= GOAL_RESTART_S)
    goals[
        f"stall under {GOAL_STALL_MS:g} ms while {arrivals} admissions arrive ({stall:.1f} ms)"
    ] = verdict(stall < GOAL_STALL_MS)
    return print_goals(goals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="queue lengths, ascending")
    parser.add_argument("--rounds", type=int, default=30, help="timed runs per operation")
    parser.add_argument("--arrivals", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=Path("bench/results/queue.json"))
    args = parser.parse_args()
    quiet_libraries()
    write_json(args.out, asyncio.run(measure(args)))


if __name__ == "__main__":
    main()
