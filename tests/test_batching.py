import math
from dataclasses import replace

from factories import make_job, make_request

from bot.batching import BatchCaps, share_of_last_call
from bot.eta import SpeedKey

BASE = make_request(scheduler="DPM++ 2M")


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


# Measured seconds per step of one call of KEY's size, by images in the call: batching saves
# time per image, as on a real device.
PIXELS = KEY.width * KEY.height
SPEEDS = {
    SpeedKey(KEY.model, PIXELS, n): per for n, per in {1: 1.0, 2: 1.5, 3: 2.0, 4: 2.5}.items()
}


def last_call(*counts):
    return [make_job(i, BASE, count=count) for i, count in enumerate(counts, start=1)]


def shared(batch, speeds=SPEEDS, free_in=0.0):
    return [job.id for job in share_of_last_call(batch, speeds, free_in)]


def test_the_last_call_is_shared_with_a_worker_free_now():
    assert shared(last_call(1, 1)) == [1]  # one image each ends sooner than two in one call
    assert shared(last_call(1, 1, 1, 1)) == [1, 2]


def test_the_last_call_is_shared_by_when_the_other_worker_is_free():
    # Steps of 1.0 s for one image ... 2.5 s for four: with the other worker free in 1.2 s,
    # three here (2.0 s) and one there (1.2 + 1.0 s) end soonest, before four here (2.5 s).
    steps = KEY.denoising_steps
    assert shared(last_call(1, 1, 1, 1), free_in=1.2 * steps) == [1, 2, 3]
    assert shared(last_call(1, 1, 1, 1), free_in=3.0 * steps) == [1, 2, 3, 4]
    assert shared(last_call(1, 1), free_in=math.inf) == [1, 2]


def test_the_last_call_is_whole_until_a_speed_is_measured_and_keeps_jobs_whole():
    assert shared(last_call(1, 1), speeds={}) == [1, 2]
    assert shared(last_call(3, 1)) == [1]  # three images here, one there: never a part of a job
    assert shared(last_call(1, 3)) == [1]
    assert shared(last_call(2, 2)) == [1]
