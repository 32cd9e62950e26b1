"""The queue index inside the service: rebuilt from SQLite at start-up, kept in step by
admission and cancel, and out-of-step moments caught by the claim's re-check."""

from __future__ import annotations

import asyncio

from factories import make_request

from bot.db import Store, Tx, jobs
from bot.intake import Intake
from bot.service import ImagineService

BACKLOG = 10_000


def small(**changes):
    return make_request(**{"model": "tiny", "steps": 2, "width": 64, "height": 64, **changes})


async def queue_directly(store: Store, count: int) -> None:
    """Rows written straight to the store, as a previous run of the bot left them."""

    async def insert_all(tx: Tx) -> None:
        for i in range(count):
            request = small(prompt=f"backlog {i}", seed=i)
            await jobs.insert(tx, request, Intake(i, 1, 1))

    await store.write(insert_all)


async def test_a_restart_with_a_long_backlog_rebuilds_the_index_and_runs_the_oldest_first(
    settings, held_runner
):
    """How fast is bench.queue's to measure ("restart"); here only that it does not hang."""
    store = await Store.open(settings.database_path)
    await queue_directly(store, BACKLOG)
    service = ImagineService(settings, store, held_runner)
    held_runner.hold()
    try:
        await service.start()  # the model is loaded already: the index load is what is timed
        await held_runner.wait_calls(1, timeout=30)
        _, specs = held_runner.calls[0]
        assert [spec.prompt for spec in specs][:1] == ["backlog 0"]  # the oldest goes first
        assert len(service.queue) == BACKLOG - len(specs)
    finally:
        held_runner.release()
        await service.close(grace=0)


async def test_admission_and_cancel_keep_the_index_in_step(settings, held_runner):
    store = await Store.open(settings.database_path)
    service = ImagineService(settings, store, held_runner)
    held_runner.hold()
    await service.start()
    try:
        first = await service.submit(small(), Intake(1))
        await held_runner.wait_calls(1)
        second = await service.submit(small(), Intake(2))
        third = await service.submit(small(), Intake(3))
        assert first.job.id not in service.queue  # claimed
        assert (second.position, third.position) == (1, 2)
        assert await service.cancel(second.job.id) is jobs.CancelOutcome.CANCELLED
        assert second.job.id not in service.queue
        assert service.queue.position(third.job.id)[0] == 1
        places = await service.queue_estimates([third.job.id, second.job.id])
        assert list(places) == [third.job.id] and places[third.job.id][0] == 1
    finally:
        held_runner.release()
        await service.executor.wait_idle()
        await service.close()


async def test_jobs_the_index_never_heard_of_are_found_and_run(settings, held_runner):
    """A row queued behind the index's back (another tool, a restore) is not stranded: an
    empty index checks the store before it sleeps, and a claim that finds a row gone
    rebuilds the index."""
    store = await Store.open(settings.database_path)
    service = ImagineService(settings, store, held_runner)
    await service.start()
    try:
        await queue_directly(store, 2)
        service.executor.wake()
        await asyncio.wait_for(service.executor.wait_idle(), 30)
        assert not await store.read(jobs.any_queued)
        # Now the other way: the index holds a job the store has cancelled.
        held_runner.hold()
        calls = len(held_runner.calls)
        kept = await service.submit(small(), Intake(1))
        await held_runner.wait_calls(calls + 1)
        stale = await service.submit(small(), Intake(2))
        fresh = await service.submit(small(width=96, height=96), Intake(3))
        await store.write(jobs.request_cancel, stale.job.id)  # behind the index's back
        held_runner.release()
        await asyncio.wait_for(service.executor.wait_idle(), 30)
        for job in (kept.job, fresh.job):
            assert (await store.read(jobs.get, job.id)).job.status == "done"
        assert (await store.read(jobs.get, stale.job.id)).job.status == "cancelled"
        assert len(service.queue) == 0
    finally:
        held_runner.release()
        await service.close()
