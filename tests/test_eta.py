import pytest
from factories import Clock, make_job, make_request

from bot.eta import SpeedKey, blend, estimate_waits, seconds_per_step
from bot.throttle import EditThrottle

BASE = make_request(steps=10)
PIXELS = 512 * 512


def job(job_id, **changes):
    return make_job(job_id, BASE, **changes)


def test_moving_average_moves_toward_new_measurements():
    assert blend(None, 2.0) == 2.0
    assert blend(2.0, 1.0) == pytest.approx(1.7)


def test_unmeasured_shapes_scale_from_the_nearest_measurement():
    speeds = {SpeedKey("m", PIXELS, 4): 0.4}
    assert seconds_per_step(speeds, SpeedKey("m", PIXELS, 4)) == 0.4
    assert seconds_per_step(speeds, SpeedKey("m", PIXELS, 2)) == pytest.approx(0.2)
    assert seconds_per_step(speeds, SpeedKey("m", 2 * PIXELS, 4)) == pytest.approx(0.8)
    assert seconds_per_step(speeds, SpeedKey("other", PIXELS, 4)) is None


def test_waits_follow_the_batches_the_executor_will_form():
    speeds = {SpeedKey("m", PIXELS, 2): 0.1, SpeedKey("m", PIXELS, 1): 0.06}
    queued = [job(1), job(2, width=256), job(3), job(4, width=256, steps=20)]
    waits = estimate_waits(queued, speeds, max_images=4, busy_for=5.0)
    # Batch 1: jobs 1 and 3 (2 images, 10 steps at 0.1 s) = 1 s after the running 5 s.
    assert waits[1] == waits[3] == pytest.approx(6.0)
    # Batch 2: job 2 alone at half the pixels: 10 steps × 0.06 s / 2.
    assert waits[2] == pytest.approx(6.3)
    # Batch 3: job 4, the same shape with 20 steps.
    assert waits[4] == pytest.approx(6.9)


def test_no_estimate_without_measurements():
    assert estimate_waits([job(1), job(2)], {}, max_images=4) == {1: None, 2: None}


def test_edits_are_throttled_per_message_and_overall():
    clock = Clock()
    throttle = EditThrottle(per_message=2.0, rate=4.0, burst=5.0, clock=clock)
    edits = 0
    messages = range(30)
    # A busy minute: 30 status messages, each wanting an edit every 100 ms.
    while clock.now < 60.0:
        for message in messages:
            edits += throttle.allow(message)
        clock.now += 0.1
    assert edits <= 5 + 4 * 60  # the shared budget: burst plus the refill rate
    assert edits >= 200  # and the budget is actually used


def test_one_message_is_edited_at_most_every_two_seconds():
    clock = Clock()
    throttle = EditThrottle(per_message=2.0, clock=clock)
    allowed = []
    while clock.now < 10.0:
        if throttle.allow("status"):
            allowed.append(clock.now)
        clock.now += 0.25
    assert allowed == [0.0, 2.0, 4.0, 6.0, 8.0]
