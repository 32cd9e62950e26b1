"""The queue index: the fair former's choices, places and work ahead, kept in step through
adds, claims and cancels, and checked against a plain recomputation over random operations."""

import random
from dataclasses import replace

import pytest
from factories import make_job, make_request

from bot import queue as queue_module
from bot.queue import QueueIndex, RankedTurns

BASE = make_request(scheduler="DPM++ 2M", steps=25)  # 1 unit
BIG = replace(BASE, count=4, width=1024, height=1024, steps=50)  # 32 units


def job(job_id, member=None, queued_at=None, weight=1.0, **changes):
    made = make_job(job_id, BASE, queued_at=queued_at, **changes)
    return replace(made, member_id=job_id if member is None else member, weight=weight)


def ids(batch):
    return [j.id for j in batch]


def index_of(*jobs, weights=None):
    index = QueueIndex()
    for one in jobs:
        index.add(replace(one, weight=(weights or {}).get(one.member_id, 1.0)))
    return index


def run_next(index, cap=8):
    """Claim the next call as the executor does; returns its jobs."""
    batch = index.next_batch(lambda key: cap)
    index.claimed(batch)
    return batch


def test_empty_queue_forms_no_batch():
    assert QueueIndex().next_batch(lambda key: 8) == []


def test_incompatible_jobs_never_share_a_batch():
    pending = [
        job(1),
        job(2, width=256),
        job(3, steps=30),
        job(4, scheduler="Euler"),
        job(6, model="other"),
        job(7, mode="image", strength=0.5),
        job(8),
    ]
    batch = index_of(*pending).next_batch(lambda key: 8)
    assert ids(batch) == [1, 8]


def test_on_load_the_oldest_job_goes_first_whatever_the_order_given():
    index = QueueIndex()
    index.load([job(5, queued_at=50), job(4, queued_at=40, width=256), job(1, queued_at=10)])
    assert ids(index.next_batch(lambda key: 8)) == [1, 5]


def test_cap_is_respected_and_later_small_jobs_fill_the_gap():
    index = index_of(job(1, count=3), job(2, count=4), job(3, count=1), job(4, count=1))
    batch = index.next_batch(lambda key: 4)
    assert ids(batch) == [1, 3]


def test_the_head_runs_even_when_it_alone_is_over_the_cap():
    assert ids(index_of(job(1, count=4), job(2)).next_batch(lambda key: 2)) == [1]


def test_a_light_member_waits_for_at_most_the_call_running_now():
    """The flooder queues 200 expensive jobs; the light member's job, queued after the first
    call started, runs in the very next call."""
    flooder = [job(i, member=1, **vars_of(BIG)) for i in range(1, 201)]
    index = index_of(*flooder)
    first = run_next(index, cap=4)
    assert ids(first) == [1]
    index.add(job(500, member=2))
    assert index.position(500)[0] == 1
    assert ids(run_next(index, cap=4)) == [500]
    assert ids(run_next(index, cap=4)) == [2]


def vars_of(request):
    return {
        "count": request.count,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
    }


def test_calls_are_filled_with_compatible_jobs_of_everyone():
    index = index_of(job(1, member=1), job(2, member=1), job(3, member=2), job(4, member=3))
    assert ids(run_next(index, cap=8)) == [1, 3, 4, 2]


def test_members_share_the_device_by_cost_and_weight():
    """Two members keep four different-shaped jobs queued each; over many calls the device
    time (units served) splits by their weights, 2:1, not by job counts."""
    index = QueueIndex()
    served = {1: 0.0, 2: 0.0}
    next_id = iter(range(1, 10_000))
    shapes = {1: {"width": 512}, 2: {"width": 768, "height": 768}}  # 1 and 2.25 units

    def top_up(member):
        while len(index.jobs_of(member)) < 4:
            weight = 2.0 if member == 1 else 1.0
            index.add(job(next(next_id), member=member, weight=weight, **shapes[member]))

    for _ in range(300):
        top_up(1)
        top_up(2)
        for one in run_next(index, cap=1):
            served[one.member_id] += one.request.cost
    assert served[1] / served[2] == pytest.approx(2.0, rel=0.05)


def test_a_big_job_runs_under_a_steady_stream_of_small_ones():
    index = index_of(job(1, member=1), job(2, member=2, **vars_of(BIG)))
    next_id = 3
    ran_at = None
    for call in range(1, 500):
        # Members 3..: a new small job arrives from someone new before every call.
        index.add(job(next_id, member=next_id))
        next_id += 1
        if 2 in ids(run_next(index, cap=4)):
            ran_at = call
            break
    assert ran_at is not None and ran_at < 10


def test_positions_and_work_ahead_follow_the_fair_order():
    index = index_of(job(1, member=1), job(2, member=1), job(3, member=2, count=2))
    # Turns: job 1 at 0, job 3 at 0 (after 1 by id), job 2 at 1.
    assert index.position(1) == (1, 1.0)
    assert index.position(3) == (2, 3.0)
    assert index.position(2) == (3, 4.0)
    assert index.position(99) is None
    index.remove(3)
    assert index.position(2) == (2, 2.0)
    assert index.images() == 2 and len(index) == 2


def test_a_newcomers_work_ahead_depends_on_what_they_already_queued():
    index = index_of(job(1, member=1), job(2, member=1), job(3, member=2))
    assert index.work_ahead_of_newcomer(member_id=9) == pytest.approx(2.0)  # jobs 1 and 3
    assert index.work_ahead_of_newcomer(member_id=1) == pytest.approx(3.0)  # behind their own


def test_pages_and_shares():
    index = index_of(
        *[job(i, member=1 + i % 2) for i in range(1, 8)],
        job(8, member=3, **vars_of(BIG)),
        weights={3: 3.0},
    )
    order = ids(index.page(0, 100))
    assert ids(index.page(2, 3)) == order[2:5]
    assert ids(index.page(7, 10)) == order[7:]
    assert index.page(0, 10, guild_id=2) == []
    shares = index.shares()
    assert [s.member_id for s in shares] == [3, 2, 1]  # then by units queued
    assert shares[0].share == pytest.approx(0.6) and shares[0].units == 32.0
    assert sum(s.jobs for s in shares) == 8


def test_ranked_turns_agree_with_a_sorted_list(monkeypatch):
    monkeypatch.setattr(queue_module, "BLOCK_SIZE", 4)  # many splits and empty blocks
    rng = random.Random(7)
    turns, plain = RankedTurns(), {}
    for step in range(3000):
        if plain and rng.random() < 0.45:
            turn = rng.choice(list(plain))
            turns.remove(turn)
            del plain[turn]
        else:
            turn = (float(rng.randint(0, 50)), step)
            cost = rng.randint(1, 9000)
            turns.add(turn, cost)
            plain[turn] = cost
        ordered = sorted(plain)
        assert list(turns) == ordered
        if ordered:
            probe = rng.choice(ordered)
            rank = ordered.index(probe)
            assert turns.ahead(probe) == (rank, sum(plain[t] for t in ordered[:rank]))
            assert turns.page(rank, 3) == ordered[rank : rank + 3]
            assert turns.first() == ordered[0]
    with pytest.raises(KeyError):
        turns.remove((-1.0, -1))


def test_the_index_agrees_with_a_recount_after_random_operations():
    rng = random.Random(3)
    index = QueueIndex()
    alive = {}
    for job_id in range(1, 600):
        roll = rng.random()
        if roll < 0.6:
            one = job(
                job_id,
                member=rng.randint(1, 12),
                count=rng.randint(1, 4),
                width=rng.choice([256, 512]),
            )
            index.add(one)
            alive[one.id] = one
        elif roll < 0.8 and alive:
            gone = rng.choice(list(alive))
            index.remove(gone)
            del alive[gone]
        else:
            for one in run_next(index, cap=rng.randint(1, 8)):
                del alive[one.id]
    order = index.page(0, len(alive))
    assert sorted(ids(order)) == sorted(alive)
    work = 0.0
    for place, one in enumerate(order, start=1):
        work += one.request.cost
        assert index.position(one.id) == (place, pytest.approx(work))
    assert index.images() == sum(one.request.count for one in alive.values())
    for member in range(1, 13):
        assert sorted(ids(index.jobs_of(member))) == sorted(
            one.id for one in alive.values() if one.member_id == member
        )


def test_a_call_on_a_resident_model_goes_first_within_the_slack():
    """Alice's job on model b heads the fair order; Bob's, on the model the worker holds, has
    nearly the same turn and goes first. Carol's is too far behind (her earlier job on b
    pushed her turn past the slack) and waits her turn."""
    alice, bob = job(1, member=1, model="b"), job(2, member=2, model="a")
    assert ids(index_of(alice, bob).next_batch(lambda key: 8)) == [1]
    assert ids(index_of(alice, bob).next_batch(lambda key: 8, resident=frozenset({"a"}))) == [2]
    assert ids(index_of(alice, bob).next_batch(lambda key: 8, resident=frozenset({"b"}))) == [1]
    carol_big = job(3, member=3, model="b", width=1024, height=1024, steps=50, count=4)
    far = index_of(alice, carol_big, job(4, member=3, model="a"))
    assert carol_big.request.cost == 32 > queue_module.RESIDENT_SLACK
    assert ids(far.next_batch(lambda key: 8, resident=frozenset({"a"}))) == [1]


def test_preferring_the_resident_model_never_starves_the_head():
    """Newcomers keep queueing jobs on the resident model with turns level with the head's;
    the head on the other model still runs after at most MAX_PASSES calls."""
    index = index_of(job(1, member=1, model="b"))
    calls = []
    for n in range(2, 20):
        index.add(job(n, member=n, model="a"))  # an idle member: the current clock as turn
        batch = index.next_batch(lambda key: 1, resident=frozenset({"a"}))
        index.claimed(batch)
        calls.append(ids(batch))
        if calls[-1] == [1]:
            break
    assert calls[-1] == [1] and len(calls) == queue_module.MAX_PASSES + 1


def serve_one_model_at_a_time(index, calls, top_up, held="a"):
    """Claim `calls` calls one image each, as a worker that holds one model at a time (the two
    models do not fit together), topping the queue up before each; returns the units each
    member was served, the number of switches and the ids claimed."""
    served, switches, claimed = {}, 0, []
    for _ in range(calls):
        top_up()
        batch = index.next_batch(lambda key: 1, resident=frozenset({held}))
        if not batch:
            break
        index.claimed(batch, resident=frozenset({held}))
        if batch[0].request.model != held:
            held, switches = batch[0].request.model, switches + 1
        for one in batch:
            served[one.member_id] = served.get(one.member_id, 0.0) + one.request.cost
            claimed.append(one.id)
    return served, switches, claimed


def test_a_member_alternating_cheap_jobs_on_another_model_pays_for_the_switches():
    """Members 1, 3 and 4 keep three jobs queued each on model a, member 2 one cheap job on
    model b, which does not fit beside a. Each switch to b is charged to member 2 as the load
    and the reload of a (SWITCH_UNITS each), so over N calls there is at most one round trip
    per 2 × SWITCH_UNITS calls of each other member (before: one per four calls or so), each
    of them is served as many units as member 2 plus member 2's loads, and every job runs."""
    index, next_id, submitted, others = QueueIndex(), iter(range(1, 10_000)), [], (1, 3, 4)

    def top_up():
        for member in others:
            while len(index.jobs_of(member)) < 3:
                submitted.append(job(next(next_id), member=member, model="a"))
                index.add(submitted[-1])
        if not index.jobs_of(2):
            submitted.append(job(next(next_id), member=2, model="b", width=256, height=256))
            index.add(submitted[-1])

    calls, units = 240, queue_module.SWITCH_UNITS
    served, switches, claimed = serve_one_model_at_a_time(index, calls, top_up)
    assert 2 <= switches <= 2 * (calls / (2 * units * len(others)) + 1)  # before: 34
    for member in others:
        assert served[member] == pytest.approx(served[2] + switches * units, abs=2 * units + 1)
    _, _, drained = serve_one_model_at_a_time(index, 100, lambda: None)
    assert sorted(claimed + drained) == sorted(one.id for one in submitted) and not len(index)


def test_loading_back_the_model_a_charged_switch_left_is_free():
    """Only the switch away is charged: the call that loads a back puts no charge on its
    member, whose next turn follows their own work alone. A worker that held nothing (at
    start-up) loads its first model free."""
    index = index_of(job(1, member=1, model="a"), job(2, member=2, model="b"))
    index.claimed(index.next_batch(lambda key: 1), resident=frozenset())  # job 1 on a: free
    index.claimed(index.next_batch(lambda key: 1), resident=frozenset({"a"}))  # job 2: b
    index.add(job(3, member=1, model="a"))
    index.claimed(index.next_batch(lambda key: 1), resident=frozenset({"b"}))  # job 3: a again
    index.add(job(4, member=2, model="b"))
    for n in range(5, 25):  # member 1's turns 2, 3, ..., 21
        index.add(job(n, member=1, model="a"))
    assert index.position(5) == (1, 1.0)  # member 1 paid nothing for loading a back
    # Member 2's turn is their finish: their unit of work, the load of b and the reload of a.
    charged = 1.0 + 2 * queue_module.SWITCH_UNITS
    assert index.position(4)[0] == 1 + sum(1 for turn in range(2, 22) if turn < charged)
