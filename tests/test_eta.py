import pytest
from factories import Clock, make_job, make_request

from bot.eta import SpeedKey, blend, seconds_per_step, seconds_per_unit, wait_seconds
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


def test_a_unit_costs_what_a_full_call_of_unit_images_takes_per_image():
    speeds = {SpeedKey("m", PIXELS, 4): 0.4, SpeedKey("m", PIXELS, 1): 0.16}
    # 25 steps of a 4-image call at 0.4 s a step, shared by its 4 images.
    assert seconds_per_unit(speeds, "m", images=4) == pytest.approx(2.5)
    assert seconds_per_unit(speeds, "m", images=1) == pytest.approx(4.0)
    assert seconds_per_unit(speeds, "m", images=0) == pytest.approx(4.0)  # an empty queue
    assert seconds_per_unit(speeds, "other", images=4) is None


def test_a_wait_is_the_running_call_plus_the_work_up_to_the_job():
    assert wait_seconds(3.0, 2.5, busy_for=5.0) == pytest.approx(12.5)
    assert wait_seconds(3.0, None, busy_for=5.0) is None


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
