"""SIGKILL the real bot process at random moments while members keep asking, restart it, and
check that every admitted job was delivered exactly once or failed with a notice and a refund.

CI runs KILL_TEST_KILLS=7 (the default: each restart imports torch, about ten seconds here);
run more by hand, e.g.
    KILL_TEST_KILLS=50 .venv/bin/python -m pytest tests/test_kill.py -s
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import time

import pytest
from harness.child_process import BotProcess
from harness.in_process import build_world

KILLS = int(os.environ.get("KILL_TEST_KILLS", "7"))


def headline(message) -> str:
    return message.content.split("\n")[0]


async def start(fake, model_cache, workdir) -> BotProcess:
    identified = len(fake.identifies)
    # No limit on jobs queued per member: queued jobs pile up across the kills.
    process = BotProcess.start(
        fake, model_cache, workdir, MAX_BATCH_SIZE="4", MAX_SIZE="128", MAX_QUEUED_PER_MEMBER="0"
    )
    deadline = time.monotonic() + 90
    while len(fake.identifies) == identified:
        if process.returncode is not None or time.monotonic() > deadline:
            raise AssertionError(f"the bot did not connect:\n{process.log()}")
        await asyncio.sleep(0.05)
    await fake.wait_until_ready(30)
    return process


def unfinished(path) -> int:
    with sqlite3.connect(path) as raw:
        return raw.execute(
            "SELECT COUNT(*) FROM jobs WHERE status IN ('queued', 'running')"
        ).fetchone()[0]


@pytest.mark.timeout(180 + 40 * KILLS)  # each restart imports torch: seconds, more under load
async def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    fake_discord, model_cache, tmp_path
):
    fake = fake_discord
    world = build_world(fake)
    members = [world.alice, world.bob, world.mod]
    rng = random.Random(20261122)
    workdir = tmp_path / "bot"
    asked = 0
    for _ in range(KILLS):
        process = await start(fake, model_cache, workdir)
        for _ in range(rng.randint(1, 4)):
            options = {
                "prompt": f"kill test {asked}",
                "seed": asked,
                "steps": rng.choice([4, 8, 12]),
                "width": rng.choice([64, 64, 128]),
                "count": rng.choice([1, 1, 2]),
            }
            await fake.slash_command(rng.choice(members), world.channel, "imagine", options)
            asked += 1
            await asyncio.sleep(rng.uniform(0, 0.3))
        # A random moment: mid-admission, mid-batch or mid-delivery.
        await asyncio.sleep(rng.uniform(0, 1.5))
        process.process.kill()
        process.process.wait(10)

    process = await start(fake, model_cache, workdir)
    try:
        deadline = time.monotonic() + 120
        while unfinished(process.database_path):
            assert time.monotonic() < deadline, process.log()
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)  # the last deliveries are posted before the rows are marked
    finally:
        await process.stop(30)

    with sqlite3.connect(process.database_path) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        jobs = raw.execute("SELECT id, member_id, status, count, withheld FROM jobs").fetchall()
        net = dict(raw.execute("SELECT job_id, SUM(milliunits) FROM ledger GROUP BY job_id"))
        charged = dict(raw.execute("SELECT job_id, milliunits FROM ledger WHERE kind = 'charge'"))
    posted = [m for m in fake.messages if not m.deleted]
    lost = duplicates = 0
    for job_id, member_id, status, count, withheld in jobs:
        line = f"<@{member_id}> job #{job_id}"
        results = [m for m in posted if headline(m) == line and m.attachments]
        notices = [m for m in posted if headline(m).startswith(f"{line} failed")]
        if status == "done":
            lost += not results
            duplicates += max(0, len(results) - 1)
            assert charged[job_id] > 0, job_id
            assert net[job_id] == (0 if withheld >= count else charged[job_id]), job_id
        else:
            assert status == "failed", (job_id, status)
            assert notices and not results, job_id
            assert net[job_id] == 0, job_id
    print(
        f"kill test: {KILLS} kills, {asked} commands, {len(jobs)} jobs admitted, "
        f"{lost} lost, {duplicates} duplicates"
    )
    assert (lost, duplicates) == (0, 0)
    assert len(jobs) >= KILLS  # most commands were admitted before their kill
