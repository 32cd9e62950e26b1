from dataclasses import replace

from factories import make_job, make_request

from bot.batching import BatchCaps, form_batch

BASE = make_request(scheduler="DPM++ 2M")


def job(job_id, queued_at=None, **changes):
    return make_job(job_id, BASE, queued_at=queued_at, **changes)


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


KEY = BASE.batch_key


def caps(ceiling=8, recovery_calls=4):
    return BatchCaps(lambda key: ceiling, recovery_calls)


def test_an_untouched_key_is_capped_at_the_ceiling():
    assert caps(ceiling=6).cap(KEY) == 6


def test_out_of_memory_halves_the_failed_size_but_never_below_one():
    limits = caps()
    assert limits.shrink(KEY, 8) == 4 and limits.cap(KEY) == 4
    assert limits.shrink(KEY, 3) == 1 and limits.cap(KEY) == 1
    assert limits.shrink(KEY, 1) == 1 and limits.cap(KEY) == 1


def test_a_lowered_cap_rises_by_one_after_enough_successful_calls():
    limits = caps(recovery_calls=4)
    limits.shrink(KEY, 4)
    for _ in range(3):
        limits.succeeded(KEY)
    assert limits.cap(KEY) == 2
    limits.succeeded(KEY)
    assert limits.cap(KEY) == 3
    limits.shrink(KEY, 3)  # a new failure starts the count again
    for _ in range(3):
        limits.succeeded(KEY)
    assert limits.cap(KEY) == 1


def test_the_cap_is_cleared_at_the_ceiling_and_never_passes_it():
    ceiling = [3]
    limits = BatchCaps(lambda key: ceiling[0], recovery_calls=1)
    limits.shrink(KEY, 2)
    limits.succeeded(KEY)
    assert limits.cap(KEY) == 2
    limits.succeeded(KEY)  # back at the ceiling: forgotten, so it follows the ceiling again
    assert limits.cap(KEY) == 3
    ceiling[0] = 5
    for _ in range(4):
        limits.succeeded(KEY)
    assert limits.cap(KEY) == 5
    limits.shrink(KEY, 5)
    ceiling[0] = 1  # the ceiling fell below the lowered cap (a later memory probe)
    assert limits.cap(KEY) == 1


def test_each_key_has_its_own_cap():
    limits = caps()
    other = replace(BASE, width=256).batch_key
    limits.shrink(KEY, 8)
    assert (limits.cap(KEY), limits.cap(other)) == (4, 8)
    for _ in range(4):
        limits.succeeded(other)
    assert (limits.cap(KEY), limits.cap(other)) == (4, 8)
