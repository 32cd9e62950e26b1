from dataclasses import replace

from bot.batching import form_batch
from bot.requests import GenerationRequest, Job

BASE = GenerationRequest(
    prompt="p",
    seed=1,
    steps=20,
    guidance=7.5,
    width=512,
    height=512,
    scheduler="DPM++ 2M",
    count=1,
    model="m",
)


def job(job_id, queued_at=None, **changes):
    request = replace(BASE, **changes)
    return Job(
        job_id,
        member_id=job_id,
        guild_id=1,
        channel_id=1,
        request=request,
        queued_at=float(job_id if queued_at is None else queued_at),
    )


def ids(batch):
    return [j.id for j in batch]


def test_empty_queue_forms_no_batch():
    assert form_batch([], 8) == []


def test_incompatible_jobs_never_share_a_batch():
    pending = [
        job(1),
        job(2, width=256),
        job(3, steps=30),
        job(4, scheduler="Euler"),
        job(5, guidance=5.0),
        job(6, model="other"),
        job(7, mode="image", strength=0.5),
        job(8),
    ]
    batch = form_batch(pending, 8)
    assert ids(batch) == [1, 8]
    keys = {j.request.batch_key for j in batch}
    assert len(keys) == 1


def test_oldest_job_goes_first_even_when_listed_last():
    pending = [
        job(5, queued_at=50),
        job(4, queued_at=40, width=256),
        job(1, queued_at=10, width=256),
    ]
    assert ids(form_batch(pending, 8)) == [1, 4]


def test_cap_is_respected_and_later_small_jobs_fill_the_gap():
    pending = [job(1, count=3), job(2, count=4), job(3, count=1), job(4, count=1)]
    batch = form_batch(pending, 4)
    assert ids(batch) == [1, 3]
    assert sum(j.request.count for j in batch) <= 4


def test_count_four_and_four_singles_fill_one_batch_of_four_each():
    assert ids(form_batch([job(1, count=4), job(2), job(3)], 4)) == [1]
    assert ids(form_batch([job(1), job(2), job(3), job(4), job(5)], 4)) == [1, 2, 3, 4]


def test_a_count_four_job_and_four_single_jobs_fill_a_batch_of_eight():
    pending = [job(1, count=4), job(2), job(3), job(4), job(5), job(6)]
    batch = form_batch(pending, 8)
    assert ids(batch) == [1, 2, 3, 4, 5]
    assert sum(j.request.count for j in batch) == 8


def test_oldest_job_larger_than_the_cap_still_runs():
    assert ids(form_batch([job(1, count=4), job(2)], 2)) == [1]
