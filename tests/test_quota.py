"""Quota (in cost units), per-member limits, refunds, bans and forget-me on a real SQLite
file."""

import asyncio
import sqlite3
from dataclasses import replace

import pytest
from factories import Clock, make_request

from bot.db import Store, admission, jobs, members, moderation, quotas
from bot.intake import AdmissionCaps, Intake
from bot.quota import (
    CostOverCap,
    MemberBanned,
    PromptBlocked,
    QuotaExceeded,
    QuotaStatus,
    TooManyQueued,
)

GUILD = 77
# One 512×512 image at 25 steps: 1 unit an image, so counts and units agree below.
REQUEST = make_request(prompt="a lighthouse in a storm", steps=25, model="tiny")


@pytest.fixture
def clock():
    return Clock(1_000_000.0)


@pytest.fixture
async def store(tmp_path, clock):
    store = await Store.open(tmp_path / "bot.sqlite3", clock=clock)
    yield store
    await store.close()


async def admit(store, member=1, count=1, limit=5, prompt=None, request=None, exempt=False, **caps):
    request = replace(request or REQUEST, count=count, prompt=prompt or REQUEST.prompt)
    intake = Intake(member, GUILD, 3, exempt=exempt)
    return await store.write(
        admission.admit, request, intake, AdmissionCaps(daily_quota=limit, **caps)
    )


def ledger(path):
    """(kind, rows, units) by kind; the ledger stores thousandths of a unit."""
    with sqlite3.connect(path) as raw:
        return raw.execute(
            "SELECT kind, COUNT(*), SUM(milliunits) / 1000.0 FROM ledger GROUP BY kind"
            " ORDER BY kind"
        ).fetchall()


def test_quota_status_arithmetic():
    status = QuotaStatus(limit=5, used=3, next_free_at=None)
    assert status.left == 2 and status.allows(2) and not status.allows(3)
    assert QuotaStatus(limit=0, used=99, next_free_at=None).allows(4)
    assert QuotaStatus(limit=1, used=1, next_free_at=None, exempt=True).left is None
    # Thousandths add up exactly: in floats 0.1 + 0.2 > 0.3.
    assert QuotaStatus(limit=0.3, used=0.1, next_free_at=None).allows(0.2)
    assert QuotaStatus(limit=0.3, used=0.1, next_free_at=None).left == 0.2


async def test_the_ledger_charges_and_refunds_cost_units(store, tmp_path):
    large = make_request(count=4, width=1024, height=1024, steps=50)  # 4 × 4 × 2 = 32 units
    job = await admit(store, count=4, limit=40, request=large)
    assert (await store.read(quotas.status, GUILD, 1, default_limit=40)).used == 32
    with pytest.raises(QuotaExceeded) as caught:
        await admit(store, count=4, limit=40, request=large)
    assert (caught.value.status.used, caught.value.asked) == (32, 32)
    await store.write(jobs.mark_failed, job.id, "boom")
    await store.write(jobs.mark_failed, job.id, "boom again")
    assert ledger(tmp_path / "bot.sqlite3") == [("charge", 1, 32.0), ("refund", 1, -32.0)]
    assert (await store.read(quotas.status, GUILD, 1, default_limit=40)).used == 0


async def test_fractions_of_a_unit_add_up_exactly(store):
    tenth = make_request(width=256, height=256, steps=10)  # ¼ of the pixels × 10/25 steps
    fifth = replace(tenth, steps=20)
    assert (tenth.cost, fifth.cost) == (0.1, 0.2)
    await admit(store, limit=0.3, request=tenth)
    await admit(store, limit=0.3, request=fifth)  # in floats, 0.1 + 0.2 would overspend
    with pytest.raises(QuotaExceeded):
        await admit(store, limit=0.3, request=replace(tenth, width=64, height=64))
    status = await store.read(quotas.status, GUILD, 1, default_limit=0.3)
    assert (status.used, status.left) == (0.3, 0.0)


async def test_a_member_may_have_so_many_jobs_queued_or_running(store, tmp_path):
    first = await admit(store, member=1, max_queued=2)
    await admit(store, member=1, max_queued=2)
    await store.write(jobs.claim_batch, [first.id])  # running counts as well as queued
    with pytest.raises(TooManyQueued) as caught:
        await admit(store, member=1, max_queued=2)
    assert (caught.value.active, caught.value.limit) == (2, 2)
    with pytest.raises(TooManyQueued):  # exempt from the daily quota, not from this
        await admit(store, member=1, max_queued=2, exempt=True)
    await admit(store, member=2, max_queued=2)  # the limit is each member's own
    assert await store.read(jobs.count) == 3
    assert ledger(tmp_path / "bot.sqlite3") == [("charge", 3, 3.0)]
    await store.write(jobs.mark_done, first.id)
    await admit(store, member=1, max_queued=2)
    await admit(store, member=1, max_queued=0)  # 0: no limit


async def test_one_request_may_cost_only_so_much(store, tmp_path):
    large = make_request(count=4, width=1024, height=1024, steps=50)
    with pytest.raises(CostOverCap) as caught:
        await admit(store, count=4, request=large, max_cost=16, exempt=True)
    assert (caught.value.request.cost, caught.value.cap) == (32, 16)
    assert await store.read(jobs.count) == 0
    assert ledger(tmp_path / "bot.sqlite3") == []
    await admit(store, count=2, request=large, max_cost=16, exempt=True)  # 16 units: at the cap


async def test_concurrent_admissions_from_one_member_never_overfill_the_queue(tmp_path):
    path = tmp_path / "race.sqlite3"
    stores = [await Store.open(path) for _ in range(4)]
    outcomes = await asyncio.gather(
        *(admit(stores[i % 4], member=42, limit=0, max_queued=3) for i in range(20)),
        return_exceptions=True,
    )
    assert sum(not isinstance(o, Exception) for o in outcomes) == 3
    assert sum(isinstance(o, TooManyQueued) for o in outcomes) == 17
    assert ledger(path) == [("charge", 3, 3.0)]
    for store in stores:
        await store.close()


async def test_counting_a_members_jobs_reads_an_index_not_the_queue(store):
    class Recorder:  # catches the query admission runs, to ask SQLite how it would run it
        async def value(self, sql, params):
            self.sql, self.params = sql, params
            return 0

    recorder = Recorder()
    await admission.active_jobs(recorder, 1)
    plan = await store.read(
        lambda tx: tx.all(f"EXPLAIN QUERY PLAN {recorder.sql}", recorder.params)
    )
    assert any("jobs_by_member_status" in row["detail"] for row in plan), [
        row["detail"] for row in plan
    ]


async def test_twenty_concurrent_admissions_against_a_quota_of_five_admit_five(tmp_path):
    path = tmp_path / "race.sqlite3"
    # Separate connections, as separate processes would have: the lock is SQLite's own.
    stores = [await Store.open(path) for _ in range(4)]
    outcomes = await asyncio.gather(
        *(admit(stores[i % 4], member=42) for i in range(20)), return_exceptions=True
    )
    admitted = [o for o in outcomes if not isinstance(o, Exception)]
    refused = [o for o in outcomes if isinstance(o, QuotaExceeded)]
    assert (len(admitted), len(refused)) == (5, 15)
    with sqlite3.connect(path) as raw:
        jobs = raw.execute("SELECT COUNT(*), SUM(count) FROM jobs").fetchone()
    assert jobs == (5, 5)
    assert ledger(path) == [("charge", 5, 5)]
    for store in stores:
        await store.close()


async def test_refused_requests_leave_nothing(store, tmp_path):
    await admit(store, count=4)
    with pytest.raises(QuotaExceeded) as caught:
        await admit(store, count=2)
    assert (caught.value.status.used, caught.value.status.limit) == (4, 5)
    await store.write(moderation.ban, GUILD, 9, moderator_id=1, reason="spam")
    with pytest.raises(MemberBanned, match="spam"):
        await admit(store, member=9)
    await store.write(moderation.add_blocked_term, GUILD, "gore", moderator_id=1)
    with pytest.raises(PromptBlocked):
        await admit(store, member=10, prompt="lots of G.O.R.E")
    assert await store.read(jobs.count) == 1
    assert ledger(tmp_path / "bot.sqlite3") == [("charge", 1, 4)]


async def test_rolling_window_frees_images_as_charges_age(store, clock):
    await admit(store, count=3)
    clock.now += 3600
    await admit(store, count=2)
    status = await store.read(quotas.status, GUILD, 1, default_limit=5)
    assert (status.used, status.left, status.next_free_at) == (5, 0, 1_000_000.0 + 86400)
    clock.now = 1_000_000.0 + 86400 + 1
    status = await store.read(quotas.status, GUILD, 1, default_limit=5)
    assert (status.used, status.left) == (2, 3)


async def test_overrides_server_default_and_reset(store):
    await admit(store, count=3, limit=3)
    with pytest.raises(QuotaExceeded):
        await admit(store, limit=3)
    await store.write(quotas.set_guild_limit, GUILD, 10)
    await admit(store, limit=3)
    await store.write(quotas.set_member_limit, GUILD, 1, 4)
    with pytest.raises(QuotaExceeded):
        await admit(store, limit=3)
    await store.write(quotas.reset_member_usage, GUILD, 1)
    assert (await store.read(quotas.status, GUILD, 1, default_limit=3)).used == 0
    await store.write(quotas.set_member_limit, GUILD, 1, 0)  # 0: unlimited for this member
    await admit(store, count=4, limit=3)
    await admit(store, count=4, limit=3, exempt=False)
    assert (await store.read(quotas.status, GUILD, 1, default_limit=3)).unlimited


async def test_exempt_members_are_not_limited(store):
    for _ in range(3):
        await admit(store, count=4, limit=1, exempt=True)


async def test_failed_cancelled_and_withheld_jobs_refund_exactly_once(tmp_path, clock):
    path = tmp_path / "bot.sqlite3"
    store = await Store.open(path, clock=clock)
    failed = await admit(store, member=1, count=2)
    withheld = await admit(store, member=1, count=2)
    partly = await admit(store, member=2, count=2)
    cancelled = await admit(store, member=3, count=1)
    await store.write(jobs.claim_batch, [failed.id, withheld.id, partly.id])
    await store.write(jobs.mark_failed, failed.id, "RuntimeError: boom")
    await store.write(jobs.mark_done, withheld.id, withheld=2)
    await store.write(jobs.mark_done, partly.id, withheld=1)  # one image delivered: no refund
    assert [j.id for j in await store.write(jobs.cancel_queued, GUILD, 3)] == [cancelled.id]
    assert (await store.read(quotas.status, GUILD, 1, default_limit=5)).used == 0
    assert (await store.read(quotas.status, GUILD, 2, default_limit=5)).used == 2
    await store.close()

    # After a restart the same failure is recorded again: still one refund each.
    store = await Store.open(path, clock=clock)
    await store.write(jobs.mark_failed, failed.id, "RuntimeError: boom again")
    await store.write(jobs.mark_done, withheld.id, withheld=2)
    assert await store.write(jobs.cancel_queued, GUILD, 3) == []
    assert ledger(path) == [("charge", 4, 7), ("refund", 3, -5)]
    await store.close()


async def test_ban_cancels_and_refunds_queued_jobs(store):
    first = await admit(store, member=5, count=2)
    await admit(store, member=6)
    cancelled = await store.write(moderation.ban, GUILD, 5, moderator_id=1, reason=None)
    assert [j.id for j in cancelled] == [first.id]
    assert (await store.read(jobs.get, first.id)).job.status == "cancelled"
    assert (await store.read(quotas.status, GUILD, 5, default_limit=5)).used == 0
    assert await store.write(moderation.unban, GUILD, 5) and not await store.write(
        moderation.unban, GUILD, 5
    )
    await admit(store, member=5)


async def test_forget_me_leaves_no_prompt_text_in_the_file(tmp_path, clock):
    path = tmp_path / "bot.sqlite3"
    store = await Store.open(path, clock=clock)
    secret = "zebra-unicorn-secret-prompt"
    done = await admit(store, member=8, prompt=f"{secret} one")
    await store.write(jobs.claim_batch, [done.id])
    await store.write(jobs.mark_done, done.id)
    await admit(store, member=8, prompt=f"{secret} two")
    await admit(store, member=9, prompt="someone else's lighthouse")
    assert await store.write(members.forget, 8) == 2
    await store.checkpoint()  # as the member cog does after forgetting
    assert await store.read(members.history, 8) == []
    assert [r.job.request.prompt for r in await store.read(members.history, 9)] == [
        "someone else's lighthouse"
    ]
    # The ledger keeps amounts, without text: member 8 used 1 unit (the queued one refunded).
    assert (await store.read(quotas.status, GUILD, 8, default_limit=5)).used == 1
    await store.close()
    for file in tmp_path.iterdir():
        assert secret.encode() not in file.read_bytes(), file.name


async def test_forget_me_waits_for_running_jobs(store):
    running = await admit(store, member=8)
    await store.write(jobs.claim_batch, [running.id])
    with pytest.raises(members.JobStillRunning):
        await store.write(members.forget, 8)
    assert await store.read(jobs.count) == 1


async def test_a_term_stored_before_accents_were_folded_is_found_by_remove_and_add(store, tmp_path):
    # A row the older rule wrote keeps its accent in the key ("nudé"); moderators type "nude".
    with sqlite3.connect(tmp_path / "bot.sqlite3") as raw:
        raw.execute(
            "INSERT INTO blocklist (guild_id, term, normalized, moderator_id, at)"
            " VALUES (?, 'Nudé', 'nudé', 1, 0)",
            (GUILD,),
        )
    assert not await store.write(moderation.add_blocked_term, GUILD, "nude", moderator_id=1)
    assert await store.write(moderation.remove_blocked_term, GUILD, "NÚDE")
    assert await store.read(moderation.blocked_terms, GUILD) == []
    assert not await store.write(moderation.remove_blocked_term, GUILD, "nude")
