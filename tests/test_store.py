import asyncio
import contextlib
import sqlite3
from dataclasses import replace

import pytest
from factories import Clock, make_request

from bot.db import Store, admission, jobs, quotas
from bot.db.schema import MIGRATIONS
from bot.intake import Intake

REQUEST = make_request(
    prompt="a panda", negative_prompt="blur", seed=42, scheduler="Euler a", count=2
)


@pytest.fixture
async def store(tmp_path):
    store = await Store.open(tmp_path / "db" / "bot.sqlite3", clock=Clock(1000.0, tick=1))
    yield store
    await store.close()


async def test_schema_is_migrated_with_wal_and_foreign_keys(tmp_path):
    path = tmp_path / "bot.sqlite3"
    store = await Store.open(path)
    assert await store.schema_version() == len(MIGRATIONS)
    await store.close()
    store = await Store.open(path)  # reopening runs no migration twice
    assert await store.schema_version() == len(MIGRATIONS)
    await store.close()
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_admitted_job_keeps_every_parameter(store):
    job = await store.write(admission.admit, REQUEST, Intake(7, 8, 9, 10))
    record = await store.read(jobs.get, job.id)
    assert record.job.request == REQUEST
    assert (record.job.member_id, record.job.guild_id, record.job.channel_id) == (7, 8, 9)
    assert record.job.status == "queued" and record.interaction_id == 10


async def test_claim_marks_the_chosen_jobs_running_and_rechecks_each(store):
    other = replace(REQUEST, width=256, count=1)
    first = await store.write(admission.admit, REQUEST, Intake(1, 1, 1))
    odd = await store.write(admission.admit, other, Intake(2, 1, 1))
    third = await store.write(admission.admit, REQUEST, Intake(3, 1, 1))
    assert [j.id for j in await store.read(jobs.pending)] == [first.id, odd.id, third.id]

    batch_id, claimed = await store.write(jobs.claim_batch, [third.id, first.id])
    assert [j.id for j in claimed] == [third.id, first.id]  # in the order the former chose
    for job in claimed:
        record = await store.read(jobs.get, job.id)
        assert record.job.status == "running" and record.job.batch_id == batch_id
        assert record.batch_size == 4 and record.job.attempts == 1 and record.started_at
    assert [j.id for j in await store.read(jobs.running, 1)] == [first.id, third.id]
    # Claiming again takes only what is still queued; nothing left to take is None.
    again = await store.write(jobs.claim_batch, [first.id, odd.id])
    assert [j.id for j in again[1]] == [odd.id]
    assert await store.write(jobs.claim_batch, [first.id]) is None
    assert not await store.read(jobs.any_queued)

    await store.write(jobs.mark_done, first.id, withheld=1)
    await store.write(jobs.mark_failed, third.id, "boom")
    await store.write(jobs.record_delivery, first.id, 55, 66, withheld=1)
    done, failed = await store.read(jobs.get, first.id), await store.read(jobs.get, third.id)
    assert (done.job.status, done.withheld, done.result_message_id) == ("done", 1, 66)
    assert done.finished_at is not None
    assert (failed.job.status, failed.error) == ("failed", "boom")


async def test_interrupted_jobs_are_queued_again_in_order(store):
    a = await store.write(admission.admit, REQUEST, Intake(1, 1, 1))
    b = await store.write(admission.admit, REQUEST, Intake(2, 1, 1))
    await store.write(jobs.claim_batch, [a.id])
    assert await store.write(jobs.recover_interrupted, max_attempts=3) == (1, [])
    assert [j.id for j in await store.read(jobs.pending)] == [a.id, b.id]


async def test_concurrent_claims_never_hand_out_a_job_twice(store):
    queued = [(await store.write(admission.admit, REQUEST, Intake(m, 1, 1))).id for m in range(10)]
    claims = await asyncio.gather(
        *(store.write(jobs.claim_batch, queued[i : i + 4]) for i in range(0, 10, 2))
    )
    seen = [job.id for claim in claims if claim for job in claim[1]]
    assert len(seen) == len(set(seen)) == 10


async def test_a_transaction_cancelled_anywhere_leaves_the_store_whole(store, tmp_path):
    """A shutdown cancels tasks wherever they are: inside BEGIN, between statements, in
    COMMIT. Each cancelled admission is all there or not there at all, and the next
    transaction starts cleanly."""
    for pauses in range(40):
        task = asyncio.create_task(store.write(admission.admit, REQUEST, Intake(pauses, 1, 1)))
        for _ in range(pauses):
            await asyncio.sleep(0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.write(admission.admit, REQUEST, Intake(1000 + pauses, 1, 1))
    with sqlite3.connect(tmp_path / "db" / "bot.sqlite3") as raw:
        rows = raw.execute("SELECT id FROM jobs ORDER BY id").fetchall()
        charged = raw.execute("SELECT job_id FROM ledger ORDER BY job_id").fetchall()
    assert rows == charged and 40 <= len(rows) < 80  # every cancelled one is whole or absent


async def test_status_check_constraint_rejects_unknown_states(store, tmp_path):
    await store.write(admission.admit, REQUEST, Intake(1, 1, 1))
    with (
        sqlite3.connect(tmp_path / "db" / "bot.sqlite3") as raw,
        pytest.raises(sqlite3.IntegrityError),
    ):
        raw.execute("UPDATE jobs SET status = 'lost'")


async def test_jobs_claimed_three_times_fail_with_a_refund_at_start_up(store):
    job = await store.write(admission.admit, REQUEST, Intake(1, 1, 1))
    for attempt in range(1, 4):
        assert (await store.write(jobs.claim_batch, [job.id]))[1][0].attempts == attempt
        requeued, failed = await store.write(jobs.recover_interrupted, max_attempts=3)
        if attempt < 3:
            assert (requeued, failed) == (1, [])
    assert [j.id for j in failed] == [job.id] and requeued == 0
    record = await store.read(jobs.get, job.id)
    assert record.job.status == "failed" and "3 times" in record.error
    assert (await store.read(quotas.status, 1, 1, default_limit=5)).used == 0


async def test_jobs_returned_by_a_shutdown_keep_their_attempts(store):
    job = await store.write(admission.admit, REQUEST, Intake(1, 1, 1))
    await store.write(jobs.claim_batch, [job.id])
    await store.write(jobs.return_to_queue, [job.id])
    record = await store.read(jobs.get, job.id)
    assert (record.job.status, record.job.attempts) == ("queued", 0)


async def test_a_job_delivered_just_before_a_crash_is_not_run_again(store):
    delivered = await store.write(admission.admit, REQUEST, Intake(1, 1, 1))
    blocked = await store.write(admission.admit, REQUEST, Intake(2, 1, 1))
    await store.write(jobs.claim_batch, [delivered.id, blocked.id])
    await store.write(jobs.record_delivery, delivered.id, 5, 6, withheld=0)
    await store.write(jobs.record_delivery, blocked.id, 5, 7, withheld=2)  # all withheld: refund
    assert await store.write(jobs.recover_interrupted, max_attempts=3) == (0, [])
    assert (await store.read(jobs.get, delivered.id)).job.status == "done"
    assert (await store.read(quotas.status, 1, 2, default_limit=5)).used == 0
    assert (await store.read(quotas.status, 1, 1, default_limit=5)).used == REQUEST.cost


async def test_a_jobs_fair_share_weight_outlives_a_restart(store):
    job = await store.write(admission.admit, REQUEST, Intake(1, 1, 1, weight=2.5))
    assert job.weight == 2.5
    assert [j.weight for j in await store.read(jobs.pending)] == [2.5]
