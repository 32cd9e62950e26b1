"""The executor on the tiny model through the real store: batching, seeds, a free event loop."""

import asyncio
import math
import sqlite3
import time
from dataclasses import replace

import numpy as np
import pytest
from factories import make_request, pixels

from bot.db import Store, admission, jobs, quotas, speeds
from bot.eta import SpeedKey
from bot.executor import Executor, ExecutorTuning, Outlets
from bot.intake import Intake
from bot.pipelines import PipelineOptions, PipelineRunner
from bot.queue import QueueIndex
from bot.requests import ImageSpec, InvalidRequest, RawOptions
from bot.service import ImagineService
from bot.workers import Lane, Lanes, LocalWorker


class Collector:
    """Listens for finished jobs the way a cog does, in delivery order."""

    def __init__(self):
        self.results = []

    async def __call__(self, result):
        self.results.append(result)


@pytest.fixture
async def service(settings, tiny_runner):
    store = await Store.open(settings.database_path)
    service = ImagineService(settings, store, tiny_runner)
    yield service
    await service.close()


async def submit(service, member, **options):
    options.setdefault("prompt", f"member {member}'s picture")
    request = service.validate(RawOptions(**options))
    return await service.submit(request, Intake(member, 1, 2))


async def test_compatible_jobs_share_a_batch_and_keep_their_seeds(service, tiny_runner):
    collected = Collector()
    service.add_listener(collected)
    # Queue first, then start: the worker finds all six waiting, as after a burst.
    admitted = [await submit(service, member, seed=100 + member) for member in range(6)]
    assert [a.position for a in admitted] == [1, 2, 3, 4, 5, 6]
    service.executor.start()
    await asyncio.wait_for(service.executor.wait_idle(), 60)

    by_job = {r.job.id: r for r in collected.results}
    assert len(by_job) == 6 and all(r.error is None for r in collected.results)
    batches = [r.batch_id for r in sorted(collected.results, key=lambda r: r.job.id)]
    assert batches[:4] == [batches[0]] * 4 and batches[4:] == [batches[4]] * 2
    assert batches[0] != batches[4]
    for entry in admitted:
        record = await service.store.read(jobs.get, entry.job.id)
        assert record.job.status == "done"
        assert record.job.batch_id == by_job[entry.job.id].batch_id

    # The image for a seed is the same when its job runs alone.
    alone = Collector()
    service.remove_listener(collected)
    service.add_listener(alone)
    solo = await submit(service, 99, prompt="member 3's picture", seed=103)
    await asyncio.wait_for(service.executor.wait_idle(), 60)
    assert alone.results[0].job.id == solo.job.id and alone.results[0].batch_images == 1
    difference = np.abs(
        pixels(alone.results[0].images[0]) - pixels(by_job[admitted[3].job.id].images[0])
    ).max()
    assert difference <= 1
    other_seed = pixels(by_job[admitted[2].job.id].images[0])
    assert np.abs(other_seed - pixels(by_job[admitted[3].job.id].images[0])).max() > 10


async def test_each_step_reaches_the_progress_listeners_until_removed(service):
    heard = []

    def listener(job_ids, done, total, previews):
        heard.append((job_ids, done, total, previews))

    service.add_progress_listener(listener)
    first = await submit(service, 1, seed=1, steps=6)  # previews every 5 steps
    service.executor.start()
    await asyncio.wait_for(service.executor.wait_idle(), 60)
    assert [step[:3] for step in heard] == [([first.job.id], done, 6) for done in range(1, 7)]
    assert [done for _, done, _, previews in heard if previews] == [5]
    assert heard[4][3][first.job.id].startswith(b"\x89PNG")

    service.remove_progress_listener(listener)
    await submit(service, 1, seed=2, steps=6)
    service.executor.wake()
    await asyncio.wait_for(service.executor.wait_idle(), 60)
    assert len(heard) == 6


async def test_incompatible_jobs_run_apart_and_the_oldest_first(service):
    collected = Collector()
    service.add_listener(collected)
    first = await submit(service, 1, seed=1, width=128)
    second = await submit(service, 2, seed=2)
    third = await submit(service, 3, seed=3, width=128, count=2)
    service.executor.start()
    await asyncio.wait_for(service.executor.wait_idle(), 60)
    order = [r.job.id for r in collected.results]
    assert order == [first.job.id, third.job.id, second.job.id]
    assert collected.results[0].batch_id == collected.results[1].batch_id
    assert collected.results[2].batch_id != collected.results[0].batch_id
    assert [r.images[0].image.size for r in collected.results] == [(128, 64), (128, 64), (64, 64)]
    assert len(collected.results[1].images) == 2


async def test_event_loop_stays_free_while_a_batch_runs(service):
    gaps = []
    stop = asyncio.Event()

    async def tick():
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    service.executor.start()
    for member in range(8):
        await submit(service, member, seed=member, steps=8)
    await asyncio.wait_for(service.executor.wait_idle(), 120)
    stop.set()
    await ticker
    assert len(gaps) > 20, "the batches ran too fast to observe the loop"
    print(f"longest event-loop gap during the batches: {max(gaps) * 1000:.0f} ms")
    assert max(gaps) < 0.25, f"event loop stalled for {max(gaps) * 1000:.0f} ms"


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError, which the executor recognises by name."""


class FaultyRunner:
    """The real runner behind a fault injector: fails calls larger than `fits` images with an
    out-of-memory error, and any call containing a prompt with "explode" with a plain error."""

    def __init__(self, runner, fits=None):
        self.runner = runner
        self.fits = fits
        self.limit = None  # what a GPU memory probe would report, per key
        self.calls = []
        self.released = 0

    def load(self, model):
        self.runner.load(model)

    def prompt_chunks(self, model, prompt):
        return self.runner.prompt_chunks(model, prompt)

    def release_memory(self):
        self.released += 1

    def resident_models(self):
        return self.runner.resident_models()

    def batch_limit(self, key):
        return self.limit

    def interrupt(self):
        self.runner.interrupt()

    def resume(self):
        self.runner.resume()

    def generate(self, key, specs, **options):
        self.calls.append(len(specs))
        if self.fits is not None and len(specs) > self.fits:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if any("explode" in spec.prompt for spec in specs):
            raise RuntimeError("the device fell over")
        return self.runner.generate(key, specs, **options)


@pytest.fixture
async def faulty(settings, tiny_runner):
    runner = FaultyRunner(tiny_runner)
    store = await Store.open(settings.database_path)
    service = ImagineService(settings, store, runner)
    collected = Collector()
    service.add_listener(collected)
    yield service, runner, collected
    await service.close()


async def test_a_failing_image_fails_its_job_alone_and_the_others_complete(faulty):
    service, runner, collected = faulty
    good = [await submit(service, m, seed=m) for m in (1, 2)]
    bad = await submit(service, 3, prompt="explode", seed=3)
    service.executor.start()
    await asyncio.wait_for(service.executor.wait_idle(), 60)
    results = {r.job.id: r for r in collected.results}
    assert results[bad.job.id].error == "RuntimeError: the device fell over"
    assert all(results[a.job.id].error is None for a in good)
    assert len({r.batch_id for r in collected.results}) == 1
    assert runner.calls[0] == 3  # one call for all three, then halves around the culprit
    record = await service.store.read(jobs.get, bad.job.id)
    assert (record.job.status, record.error) == ("failed", "RuntimeError: the device fell over")
    assert (await service.store.read(jobs.get, good[0].job.id)).job.status == "done"


async def test_out_of_memory_splits_the_batch_and_lowers_then_raises_the_cap(faulty):
    service, runner, collected = faulty
    runner.fits = 2
    first = [await submit(service, m, seed=m) for m in range(4)]
    service.executor.start()
    await asyncio.wait_for(service.executor.wait_idle(), 60)
    assert runner.calls == [4, 2, 2]
    assert runner.released == 1
    assert all(r.error is None for r in collected.results) and len(collected.results) == 4
    key = first[0].job.request.batch_key
    assert service.executor.caps.cap(key) == 2

    # The lowered cap is used straight away, then raised by one after enough good calls.
    runner.calls.clear()
    for round_ in range(4):
        for m in range(2):  # admitted straight into the store, then one wake-up: one batch
            request = service.validate(RawOptions(prompt="again", seed=100 + round_ * 2 + m))
            await service.store.write(admission.admit, request, Intake(m, 1, 2))
        service.executor.wake()
        await asyncio.wait_for(service.executor.wait_idle(), 60)
    assert runner.calls == [2, 2, 2, 2]
    assert service.executor.caps.cap(key) == 3


async def test_calls_stay_within_what_the_memory_probe_says_fits(faulty):
    service, runner, collected = faulty
    runner.limit, runner.fits = 3, 2
    first = [await submit(service, m, seed=m) for m in range(4)]
    key = first[0].job.request.batch_key
    assert service.executor.caps.cap(key) == 3  # below MAX_BATCH_SIZE=4
    service.executor.start()
    await asyncio.wait_for(service.executor.wait_idle(), 60)
    assert runner.calls == [3, 1, 1, 1, 1]  # sliced at 3; 3 did not fit after all, so halves
    assert all(r.error is None for r in collected.results) and len(collected.results) == 4

    # After an out-of-memory error the cap recovers to the probe's limit, never past it.
    runner.fits = None
    for round_ in range(12):
        for m in range(4):
            request = service.validate(RawOptions(prompt="again", seed=100 + round_ * 4 + m))
            await service.store.write(admission.admit, request, Intake(m, 1, 2))
        service.executor.wake()
        await asyncio.wait_for(service.executor.wait_idle(), 60)
    assert max(runner.calls[5:]) == 3 and service.executor.caps.cap(key) == 3


async def test_an_image_that_never_fits_fails_with_a_clear_message(faulty):
    service, runner, collected = faulty
    runner.fits = 0
    job = await submit(service, 1, seed=1, count=2)
    service.executor.start()
    await asyncio.wait_for(service.executor.wait_idle(), 60)
    assert runner.calls == [2, 1, 1]
    assert "did not fit in GPU memory" in collected.results[0].error
    assert (await service.store.read(jobs.get, job.job.id)).job.status == "failed"
    assert (await service.store.read(quotas.status, 1, 1, default_limit=5)).used == 0  # refunded


async def test_prompts_up_to_the_chunk_limit_are_admitted_and_longer_refused(service):
    # "panda" is 5 tiny-model tokens: 60 of them fill 4 chunks of 75, 61 need a fifth.
    admitted = await submit(service, 1, prompt=" ".join(["panda"] * 60), seed=1)
    assert admitted.job.request.prompt.count("panda") == 60  # all of it, nothing cut
    with pytest.raises(InvalidRequest, match="5 chunks of 75 tokens; at most 4"):
        await submit(service, 1, prompt=" ".join(["panda"] * 61), seed=1)
    with pytest.raises(InvalidRequest, match="`negative_prompt`"):
        await submit(service, 1, negative_prompt="(unclosed", seed=1)
    assert await service.store.read(jobs.count) == 1


class BlankRunner(FaultyRunner):
    """Marks images of prompts containing "blank" as still NaN after the float32 retry,
    as the real runner does (GeneratedImage.error)."""

    def generate(self, key, specs, **options):
        images = self.runner.generate(key, specs, **options)
        return [
            replace(image, error="the image came out blank (NaN)")
            if "blank" in spec.prompt
            else image
            for spec, image in zip(specs, images, strict=True)
        ]


async def test_blank_images_fail_their_job_with_a_refund(settings, tiny_runner):
    store = await Store.open(settings.database_path)
    service = ImagineService(settings, store, BlankRunner(tiny_runner))
    collected = Collector()
    service.add_listener(collected)
    try:
        bad = await submit(service, 1, prompt="blank", seed=1, count=2)
        good = await submit(service, 2, seed=2)
        service.executor.start()
        await asyncio.wait_for(service.executor.wait_idle(), 60)
        results = {r.job.id: r for r in collected.results}
        assert results[bad.job.id].error == "the image came out blank (NaN)"
        assert results[bad.job.id].images == [] and results[good.job.id].error is None
        assert (await store.read(jobs.get, bad.job.id)).job.status == "failed"
        assert (await store.read(quotas.status, 1, 1, default_limit=5)).used == 0
    finally:
        await service.close()


async def test_slow_deliveries_do_not_hold_up_the_next_batch(settings, tiny_runner):
    """Uploading to Discord takes a while; the device starts the next batch meanwhile."""
    started = []

    class Timed(FaultyRunner):
        def generate(self, key, specs, **options):
            started.append(time.monotonic())
            return self.runner.generate(key, specs, **options)

    delivered = []

    async def slow_upload(result):
        await asyncio.sleep(0.5)
        delivered.append(time.monotonic())

    store = await Store.open(settings.database_path)
    service = ImagineService(settings, store, Timed(tiny_runner))
    service.add_listener(slow_upload)
    try:
        first = await submit(service, 1, seed=1)
        second = await submit(service, 2, seed=2, width=128)
        service.executor.start()
        await asyncio.wait_for(service.executor.wait_idle(), 60)
        assert len(started) == 2 and len(delivered) == 2
        assert started[1] < delivered[0]  # batch two ran while batch one was being posted
        for entry in (first, second):  # and wait_idle still waited for every delivery
            assert (await store.read(jobs.get, entry.job.id)).job.status == "done"
    finally:
        await service.close()


def fail_once(monkeypatch, module, name, *, only=None):
    """Make `module.name` raise a database error once (for job `only`, if given); returns
    the list of calls it failed."""
    real = getattr(module, name)
    failed = []

    async def flaky(tx, *args, **kwargs):
        if not failed and (only is None or args[0] == only):
            failed.append(args)
            raise sqlite3.OperationalError("disk I/O error")
        return await real(tx, *args, **kwargs)

    monkeypatch.setattr(module, name, flaky)
    return failed


async def test_a_database_error_in_a_batch_fails_its_jobs_and_the_queue_goes_on(
    service, monkeypatch, caplog
):
    """The drain task survives: the hit batch's jobs fail with a refund (never left running),
    the log names them, and the next job runs."""
    collected = Collector()
    service.add_listener(collected)
    failed = fail_once(monkeypatch, jobs, "finish_batch")
    hit = await submit(service, 1, seed=1)
    service.executor.start()
    await asyncio.wait_for(service.executor.wait_idle(), 60)
    assert failed
    record = await service.store.read(jobs.get, hit.job.id)
    assert record.job.status == "failed" and "internal error" in record.error
    assert (await service.store.read(quotas.status, 1, 1, default_limit=5)).used == 0
    assert any(f"jobs [{hit.job.id}]" in r.getMessage() and r.exc_info for r in caplog.records)
    later = await submit(service, 2, seed=2)
    await asyncio.wait_for(service.executor.wait_idle(), 60)
    assert (await service.store.read(jobs.get, later.job.id)).job.status == "done"
    assert [r.error is None for r in collected.results] == [False, True]


async def test_a_failed_claim_is_logged_and_tried_again(service, monkeypatch, caplog):
    failed = fail_once(monkeypatch, jobs, "claim_batch")
    job = await submit(service, 1, seed=1)
    service.executor.start()
    await asyncio.wait_for(service.executor.wait_idle(), 60)
    assert failed and any("drain failed" in r.getMessage() for r in caplog.records)
    assert (await service.store.read(jobs.get, job.job.id)).job.status == "done"


async def test_a_database_error_while_finishing_a_job_is_logged_and_delivery_goes_on(
    service, monkeypatch, caplog
):
    """The delivery task survives a failed write: a passing error is retried, a lasting one
    is logged with the job's id, and the jobs after it are still delivered and marked."""
    first = await submit(service, 1, seed=1)
    second = await submit(service, 2, seed=2, width=128)  # its own batch, delivered after
    failed = fail_once(monkeypatch, jobs, "mark_done", only=first.job.id)
    service.executor.start()
    await asyncio.wait_for(service.executor.wait_idle(), 60)
    assert failed
    assert (await service.store.read(jobs.get, first.job.id)).job.status == "done"  # retried
    assert any(str(first.job.id) in r.getMessage() for r in caplog.records)

    real = jobs.mark_done

    async def broken_for_third(tx, job_id, **kwargs):
        if job_id == third.job.id:
            raise sqlite3.OperationalError("disk I/O error")
        return await real(tx, job_id, **kwargs)

    monkeypatch.setattr(jobs, "mark_done", broken_for_third)
    caplog.clear()
    third = await submit(service, 3, seed=3)
    fourth = await submit(service, 4, seed=4, width=128)
    await asyncio.wait_for(service.executor.wait_idle(), 60)
    assert any(
        f"finishing job {third.job.id} failed" in r.getMessage() and r.exc_info
        for r in caplog.records
    )
    assert (await service.store.read(jobs.get, fourth.job.id)).job.status == "done"
    for entry in (first, second):
        assert (await service.store.read(jobs.get, entry.job.id)).job.status == "done"


LIGHTHOUSE = make_request(prompt="a lighthouse", model="tiny", steps=3, width=64, height=64)


@pytest.fixture
def two_runners(tiny_runner, model_cache):
    """Two real runners behind fault injectors, as two Ray workers' devices would be."""
    second = PipelineRunner(PipelineOptions(device="cpu", cache_dir=model_cache))
    second.load("tiny")
    return FaultyRunner(tiny_runner), FaultyRunner(second)


async def run_on_workers(store, runners, members):
    """`members` lighthouse jobs (seeds 0, 1, ...) through an executor with one worker per
    runner; returns the executor, stopped, and what it delivered."""
    for member in range(members):
        request = replace(LIGHTHOUSE, seed=member)
        await store.write(admission.admit, request, Intake(member, 1, 2))
    collected = Collector()
    executor = Executor(
        store,
        runners[0],
        QueueIndex(),
        ExecutorTuning(max_batch_size=4),
        Outlets(collected),
        workers=lambda: [LocalWorker(runner, f"worker {i}") for i, runner in enumerate(runners)],
    )
    executor.start()
    executor.wake()
    await asyncio.wait_for(executor.wait_idle(), 120)
    await executor.stop()
    assert len(collected.results) == members and all(r.error is None for r in collected.results)
    return executor, collected.results


async def test_with_several_workers_calls_fit_the_smallest_measured_device(settings, two_runners):
    """Ray workers report their own memory probes; the batch former does not choose the
    worker, so every call must fit the device with the least room (here 2 of MAX_BATCH_SIZE 4;
    a worker that measured nothing, a CPU, does not limit it)."""
    roomy, tight = two_runners
    roomy.limit, tight.limit = 3, 2
    store = await Store.open(settings.database_path)
    try:
        executor, _ = await run_on_workers(store, [roomy, tight], 7)
    finally:
        await store.close()
    assert executor.ceiling_for(LIGHTHOUSE.batch_key) == 2
    assert sorted(roomy.calls + tight.calls) == [1, 2, 2, 2]
    lanes = Lanes()
    tight.limit = None
    await lanes.open(lambda: [LocalWorker(roomy, "roomy"), LocalWorker(tight, "cpu")])
    assert lanes.batch_limit(LIGHTHOUSE.batch_key) == 3


async def test_two_idle_workers_share_the_queues_last_call(settings, two_runners):
    """Two members asking at once on two idle workers: each worker draws one image, since two
    images in one call were measured slower than one, instead of one worker drawing both while
    the other idles. The seeds give the same pixels as in one call of both (within 1/255)."""
    first, second = two_runners
    store = await Store.open(settings.database_path)
    try:
        for images, per_step in ((1, 0.10), (2, 0.15)):
            await store.write(speeds.record, SpeedKey("tiny", 64 * 64, images), per_step)
        _, results = await run_on_workers(store, [first, second], 2)
    finally:
        await store.close()
    assert first.calls == [1] and second.calls == [1]
    assert len({result.batch_id for result in results}) == 2
    specs = [ImageSpec(LIGHTHOUSE.prompt, LIGHTHOUSE.negative_prompt, seed) for seed in (0, 1)]
    alone = first.runner.generate(LIGHTHOUSE.batch_key, specs)
    by_seed = {result.job.request.seed: result.images[0].image for result in results}
    for seed, image in enumerate(alone):
        assert np.abs(pixels(by_seed[seed]) - pixels(image.image)).max() <= 1


def test_a_lane_is_free_now_idle_later_by_its_steps_and_never_while_restarting(
    tiny_runner, model_cache
):
    lanes = Lanes()
    lanes.all = [Lane(LocalWorker(tiny_runner, "a")), Lane(LocalWorker(tiny_runner, "b"))]
    lane, other = lanes.all
    assert lanes.others_free_in(lane, "tiny") == 0.0  # idle
    other.busy_since, other.steps = time.monotonic() - 2.0, (0, 10)
    assert lanes.others_free_in(lane, "tiny") == math.inf  # busy, no step heard yet: can't tell
    other.steps = (5, 10)
    assert 1.9 < lanes.others_free_in(lane, "tiny") < 2.5  # half done in 2 s
    other.busy_since, other.up = None, False
    assert lanes.others_free_in(lane, "tiny") == math.inf  # its worker is restarting
    other.up = True
    # A worker without the model would load it first: it does not count as soon free.
    empty = PipelineRunner(PipelineOptions(device="cpu", cache_dir=model_cache))
    lanes.all = [lane, Lane(LocalWorker(empty, "empty"))]
    assert lanes.others_free_in(lane, "tiny") == math.inf
    assert Lanes().others_free_in(lane, "tiny") == math.inf


class HoldsModels:
    """A runner stand-in for claims alone: it holds the models it is given and runs nothing."""

    def __init__(self, held):
        self.held = frozenset(held)

    def resident_models(self):
        return self.held

    def batch_limit(self, key):
        return None


async def test_a_claim_charges_a_switch_of_model_to_the_member_who_asks_for_it(settings):
    """The executor tells the queue which models the claiming worker holds: member 2's call on
    model b, on a worker holding c, costs member 2 the load and a reload, so their next job
    waits behind all five of member 1's instead of coming third."""
    store = await Store.open(settings.database_path)

    async def admit(member, model):
        return await store.write(admission.admit, make_request(model=model), Intake(member, 1, 2))

    try:
        first = await admit(2, "b")
        for _ in range(5):
            await admit(1, "a")
        runner, queue = HoldsModels({"c"}), QueueIndex()
        executor = Executor(store, runner, queue, ExecutorTuning(4), Outlets(Collector()))
        await executor.reload_queue()
        _, batch = await executor.claim_next(Lane(LocalWorker(runner)))
        assert [job.id for job in batch] == [first.id]
        queue.add(later := await admit(2, "b"))
        assert queue.position(later.id)[0] == 6
    finally:
        await store.close()
