"""The queue in memory, in fair order: which call runs next, a job's place, the work ahead.

SQLite stays the truth (bot/db/jobs.py); this index is loaded from it at start-up, kept in
step by admission, claim and cancel, and rebuilt whenever a claim finds it out of step.

Fair share is start-time fair queuing over members, by cost: a job's turn is
max(virtual clock, its member's previous finish), and its member's finish moves on by
cost / weight. The job with the earliest turn heads the next call, which is filled with
compatible jobs of everyone in turn order. A member who was idle gets the current clock as
their turn, so they wait for at most the call running now; a big job's turn is fixed when it
arrives and the clock passes it, so it runs however many small jobs keep coming.

Loading a model costs seconds to minutes, so a job on a model the worker holds may go before
a head whose model it would have to load: only if its turn is within RESIDENT_SLACK units of
the head's, and at most MAX_PASSES calls in a row, so the head waits a bounded time and the
switch, when it comes, costs one load.

That load, and the reload of the model it pushes out, are paid by the member whose call makes
the switch: their finish moves on by 2 × SWITCH_UNITS / weight, as if the device had run that
much of their work; loading the old model back is then free. A member keeping cheap jobs
queued on a model that does not fit beside the loaded one thus switches only as often as their
own share pays for two loads, the others keep theirs, and every job still runs (a charge moves
that member's later turns by a fixed amount). A minimum residency would make everyone on the
other model wait, thrash or not, and charge the loads to nobody. Where two models do fit
together (the queue cannot tell), the member pays once for a reload that never comes.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass

from bot.quota import MILLI, milliunits
from bot.requests import BatchKey, Job

# Turns are kept in blocks of about this many, each with its cost sum: a job's rank and the
# work ahead of it take two bisects and a block's partial sum, not a walk over the queue.
BLOCK_SIZE = 256
# How far (in virtual time: cost units over weight) a job's turn may be behind the fair head's
# for its model being loaded already to put it first, and how many calls in a row may do so.
RESIDENT_SLACK = 4.0
MAX_PASSES = 3
# What loading a model is charged, in cost units: assumed (not measured on a GPU) about 4 s,
# SD 1.5 in half precision from the page cache, and a unit about 0.25 s in batched calls.
SWITCH_UNITS = 16.0

Turn = tuple[float, int]  # (virtual start, job id): the fair order
DepthWatcher = Callable[[BatchKey, int], None]  # (key, jobs now queued with it)


class RankedTurns:
    """Turns in order, in blocks with cost sums, so rank and work ahead cost O(√n) at most."""

    def __init__(self) -> None:
        self._blocks: list[list[Turn]] = []
        self._costs: list[list[int]] = []
        self._sums: list[int] = []
        self._maxes: list[Turn] = []
        self._prefix: tuple[list[int], list[int]] | None = None

    @classmethod
    def from_sorted(cls, turns: list[tuple[Turn, int]]) -> RankedTurns:
        """Built at once from (turn, cost) pairs already in order."""
        ranked = cls()
        for start in range(0, len(turns), BLOCK_SIZE):
            part = turns[start : start + BLOCK_SIZE]
            ranked._blocks.append([turn for turn, _ in part])
            ranked._costs.append([cost for _, cost in part])
            ranked._sums.append(sum(ranked._costs[-1]))
            ranked._maxes.append(part[-1][0])
        return ranked

    def __iter__(self) -> Iterator[Turn]:
        for block in self._blocks:
            yield from block

    def first(self) -> Turn | None:
        return self._blocks[0][0] if self._blocks else None

    def add(self, turn: Turn, cost: int) -> None:
        self._prefix = None
        if not self._blocks:
            self._blocks, self._costs, self._sums, self._maxes = [[turn]], [[cost]], [cost], [turn]
            return
        b = min(bisect.bisect_left(self._maxes, turn), len(self._blocks) - 1)
        block = self._blocks[b]
        i = bisect.bisect_left(block, turn)
        block.insert(i, turn)
        self._costs[b].insert(i, cost)
        self._sums[b] += cost
        self._maxes[b] = block[-1]
        if len(block) > 2 * BLOCK_SIZE:
            self._split(b)

    def remove(self, turn: Turn) -> None:
        self._prefix = None
        b = bisect.bisect_left(self._maxes, turn)
        block = self._blocks[b]
        i = bisect.bisect_left(block, turn)
        if block[i] != turn:
            raise KeyError(turn)
        del block[i]
        self._sums[b] -= self._costs[b].pop(i)
        if block:
            self._maxes[b] = block[-1]
        else:
            del self._blocks[b], self._costs[b], self._sums[b], self._maxes[b]

    def ahead(self, turn: Turn) -> tuple[int, int]:
        """How many turns come before `turn`, and their cost in thousandths."""
        counts, costs = self._prefixes()
        b = bisect.bisect_left(self._maxes, turn)
        if b == len(self._blocks):
            return counts[-1], costs[-1]
        i = bisect.bisect_left(self._blocks[b], turn)
        return counts[b] + i, costs[b] + sum(self._costs[b][:i])

    def _prefixes(self) -> tuple[list[int], list[int]]:
        """Turns and cost before each block, summed again after a change: many places are
        asked between two changes (a status board tick), each then a bisect."""
        if self._prefix is None:
            counts = [0, *itertools.accumulate(map(len, self._blocks))]
            self._prefix = (counts, [0, *itertools.accumulate(self._sums)])
        return self._prefix

    def page(self, offset: int, limit: int) -> list[Turn]:
        """`limit` turns from rank `offset` on, skipping whole blocks to get there."""
        found: list[Turn] = []
        for block in self._blocks:
            if offset >= len(block):
                offset -= len(block)
                continue
            found += block[offset : offset + limit - len(found)]
            offset = 0
            if len(found) >= limit:
                break
        return found

    def _split(self, b: int) -> None:
        block, costs = self._blocks[b], self._costs[b]
        half = len(block) // 2
        self._blocks[b : b + 1] = [block[:half], block[half:]]
        self._costs[b : b + 1] = [costs[:half], costs[half:]]
        self._sums[b : b + 1] = [sum(costs[:half]), sum(costs[half:])]
        self._maxes[b : b + 1] = [block[half - 1], block[-1]]


@dataclass(frozen=True)
class MemberShare:
    """What one member has waiting and the share of the device the fair order gives them."""

    member_id: int
    jobs: int
    units: float
    weight: float
    share: float


class QueueIndex:
    """Queued jobs by fair turn, by batch key and by member. Not thread-safe: the event
    loop owns it."""

    def __init__(self, switch_units: float = SWITCH_UNITS) -> None:
        """An empty index that charges each model switch `switch_units` twice (0: free)."""
        self.switch_units = switch_units
        self._watcher: DepthWatcher | None = None
        self._reset()

    def watch_depths(self, watcher: DepthWatcher) -> None:
        """`watcher(key, jobs)` hears each key's depth now and whenever it changes, so the
        metrics keep their gauges without walking the queue."""
        self._watcher = watcher
        self._tell_depths(self._by_key)

    def _tell_depths(self, keys: Collection[BatchKey]) -> None:
        if self._watcher is not None:
            for key in keys:
                self._watcher(key, len(self._by_key.get(key, ())))

    def _reset(self) -> None:
        self.clock = 0.0
        self._images = 0
        self._jobs: dict[int, Job] = {}
        self._turns: dict[int, Turn] = {}
        self._order = RankedTurns()
        self._by_key: dict[BatchKey, list[Turn]] = {}
        self._by_member: dict[int, list[Turn]] = {}
        self._finish: dict[int, float] = {}  # each member's latest finish tag
        self._member_cost: dict[int, int] = {}
        self._passed = (0, 0)  # (fair head's job id, calls that went before it)
        self._returns: dict[str, frozenset[str]] = {}  # loaded by a charged switch: what it left

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._jobs

    def job(self, job_id: int) -> Job:
        return self._jobs[job_id]

    def images(self) -> int:
        """Images waiting in all."""
        return self._images

    def load(self, queued: Iterable[Job]) -> None:
        """Replace everything with `queued`, as at start-up: turns are dealt again from a fresh
        clock in queue order. Built in bulk (one sort per list), so a long backlog loads fast."""
        stale = list(self._by_key)
        self._reset()
        turns: list[tuple[Turn, int]] = []
        for job in sorted(queued, key=lambda job: (job.queued_at, job.id)):
            turn = self._deal(job)
            cost = milliunits(job.request.cost)
            turns.append((turn, cost))
            self._by_key.setdefault(job.request.batch_key, []).append(turn)
            self._by_member.setdefault(job.member_id, []).append(turn)
            self._member_cost[job.member_id] = self._member_cost.get(job.member_id, 0) + cost
        turns.sort()
        self._order = RankedTurns.from_sorted(turns)
        for index in (self._by_key, self._by_member):
            for listed in index.values():
                listed.sort()
        self._tell_depths({*stale, *self._by_key})

    def _deal(self, job: Job) -> Turn:
        """Give a job its member's next turn (later the lighter their weight) and remember it."""
        member = job.member_id
        start = max(self.clock, self._finish.get(member, self.clock))
        self._finish[member] = start + job.request.cost / job.weight
        turn = (start, job.id)
        self._jobs[job.id] = job
        self._turns[job.id] = turn
        self._images += job.request.count
        return turn

    def add(self, job: Job) -> None:
        """A newly queued job takes its member's next turn."""
        if job.id in self._jobs:
            return
        turn = self._deal(job)
        cost = milliunits(job.request.cost)
        self._order.add(turn, cost)
        bisect.insort(self._by_key.setdefault(job.request.batch_key, []), turn)
        bisect.insort(self._by_member.setdefault(job.member_id, []), turn)
        self._member_cost[job.member_id] = self._member_cost.get(job.member_id, 0) + cost
        self._tell_depths((job.request.batch_key,))

    def remove(self, job_id: int) -> Job | None:
        """Take a job out (claimed, cancelled, forgotten); unknown ids are ignored."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return None
        turn = self._turns.pop(job_id)
        self._order.remove(turn)
        key, member = job.request.batch_key, job.member_id
        _discard(self._by_key, key, turn)
        _discard(self._by_member, member, turn)
        self._tell_depths((key,))
        self._member_cost[member] -= milliunits(job.request.cost)
        self._images -= job.request.count
        if member not in self._by_member:
            del self._member_cost[member]
            if self._finish.get(member, 0.0) <= self.clock:
                del self._finish[member]  # idle and owed nothing: forget them
        return job

    def next_batch(
        self, cap: Callable[[BatchKey], int], resident: frozenset[str] = frozenset()
    ) -> list[Job]:
        """The next call: the job with the earliest turn, then compatible jobs of everyone in
        turn order while their images fit under `cap(key)`. The head goes even when it alone
        is over the cap (the executor runs it in slices), so nobody starves. With `resident`
        (the models the worker holds), see `_resident_head`."""
        first = self._order.first()
        if first is None:
            return []
        head = self._jobs[first[1]]
        if resident and head.request.model not in resident:
            head = self._resident_head(first, resident) or head
        key = head.request.batch_key
        limit = cap(key)
        batch, images = [head], head.request.count
        for _, job_id in self._by_key[key]:
            if images >= limit:
                break
            job = self._jobs[job_id]
            if job is not head and images + job.request.count <= limit:
                batch.append(job)
                images += job.request.count
        return batch

    def _resident_head(self, first: Turn, resident: frozenset[str]) -> Job | None:
        """The earliest job on a resident model, if its turn is within RESIDENT_SLACK of the
        fair head's (`first`) and the head has been passed over fewer than MAX_PASSES times."""
        head_id, passes = self._passed
        if head_id == first[1] and passes >= MAX_PASSES:
            return None
        turns = [turns[0] for key, turns in self._by_key.items() if key.model in resident]
        best = min(turns, default=None)
        if best is None or best[0] > first[0] + RESIDENT_SLACK:
            return None
        return self._jobs[best[1]]

    def claimed(self, batch: Iterable[Job], resident: frozenset[str] = frozenset()) -> None:
        """The batch left the queue for a worker holding `resident`: the virtual clock moves to
        its head's turn. A fair head left behind (for a resident model) counts the time it was
        passed over; a switch of model is charged (see `_charge_switch`)."""
        batch = list(batch)
        first = self._order.first()
        if first is not None and all(job.id != first[1] for job in batch):
            head_id, passes = self._passed
            self._passed = (first[1], passes + 1 if head_id == first[1] else 1)
        turns = [self._turns[job.id] for job in batch if job.id in self._turns]
        if turns:
            self.clock = max(self.clock, min(turns)[0])
            self._charge_switch(batch[0], resident)
        for job in batch:
            self.remove(job.id)

    def _charge_switch(self, head: Job, resident: frozenset[str]) -> None:
        """A call on a model the worker lacks (while it holds others) costs its head's member
        the load and the reload of what it leaves, unless it loads back what a charged switch
        left, which that switch paid for. A worker that holds nothing loads free."""
        model = head.request.model
        if not resident or model in resident or not self.switch_units or head.id not in self._turns:
            return
        left = frozenset().union(*(self._returns.pop(held, ()) for held in resident))
        if model in left:
            return
        self._returns[model] = resident
        self._finish[head.member_id] += 2 * self.switch_units / head.weight

    def position(self, job_id: int) -> tuple[int, float] | None:
        """(1 for the next job to run, units of work up to and including it); None when the
        job is not queued."""
        turn = self._turns.get(job_id)
        if turn is None:
            return None
        count, cost = self._order.ahead(turn)
        return count + 1, (cost + milliunits(self._jobs[job_id].request.cost)) / MILLI

    def work_ahead_of_newcomer(self, member_id: int) -> float:
        """Units a job admitted now by `member_id` would wait behind (for the dry run)."""
        start = max(self.clock, self._finish.get(member_id, self.clock))
        return self._order.ahead((start, 2**63))[1] / MILLI

    def page(self, offset: int, limit: int, guild_id: int | None = None) -> list[Job]:
        """Queued jobs in the order they are due to run; with `guild_id`, that server's only
        (a walk that stops once the page is full)."""
        if guild_id is None:
            return [self._jobs[job_id] for _, job_id in self._order.page(offset, limit)]
        found: list[Job] = []
        for _, job_id in self._order:
            job = self._jobs[job_id]
            if (job.guild_id or 0) != guild_id:
                continue
            if offset:
                offset -= 1
                continue
            found.append(job)
            if len(found) >= limit:
                break
        return found

    def jobs_of(self, member_id: int) -> list[Job]:
        return [self._jobs[job_id] for _, job_id in self._by_member.get(member_id, [])]

    def shares(self, guild_id: int | None = None) -> list[MemberShare]:
        """Each waiting member's jobs, units and the device share their weight gives them
        while they have work queued, largest first. With `guild_id`, only that server's jobs
        and members (a walk over the queue); the share is still of the whole device."""
        weights = {
            member: max(self._jobs[job_id].weight for _, job_id in turns)
            for member, turns in self._by_member.items()
        }
        total = sum(weights.values()) or 1.0
        found: list[MemberShare] = []
        for member, turns in self._by_member.items():
            waiting = [self._jobs[job_id] for _, job_id in turns]
            if guild_id is None:
                cost, weight = self._member_cost[member], weights[member]
            else:
                waiting = [job for job in waiting if (job.guild_id or 0) == guild_id]
                cost = sum(milliunits(job.request.cost) for job in waiting)
                weight = max((job.weight for job in waiting), default=0.0)
            if waiting:
                share = MemberShare(member, len(waiting), cost / MILLI, weight, weight / total)
                found.append(share)
        return sorted(found, key=lambda share: (-share.share, -share.units, share.member_id))


def _discard(index: dict, name: object, turn: Turn) -> None:
    turns = index[name]
    del turns[bisect.bisect_left(turns, turn)]
    if not turns:
        del index[name]
