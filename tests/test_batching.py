from dataclasses import replace

from factories import make_request

from bot.batching import BatchCaps

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
