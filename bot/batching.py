"""The batch caps: how many images one call of a key may hold after out-of-memory errors;
and, with several workers, how the queue's last call is shared. Which jobs share the next call
is the queue's to say (bot/queue.py).

Pure and deterministic so the memory rules can be tested without torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from bot.eta import SpeedKey, seconds_per_step
from bot.requests import BatchKey, Job

# Successful calls at a lowered cap before it is raised by one image again.
CAP_RECOVERY_CALLS = 4


class BatchCaps:
    """Per batch key, the most images one call may hold: the ceiling (what the settings and
    the memory probe allow), or less after an out-of-memory error. A lowered cap creeps back
    up by one image after `recovery_calls` successful calls, as memory is often freed later."""

    def __init__(
        self, ceiling: Callable[[BatchKey], int], recovery_calls: int = CAP_RECOVERY_CALLS
    ) -> None:
        self._ceiling = ceiling
        self._recovery_calls = recovery_calls
        self._caps: dict[BatchKey, int] = {}
        self._calls_at_cap: dict[BatchKey, int] = {}

    def cap(self, key: BatchKey) -> int:
        """The images the next call of `key` may hold; never above the ceiling."""
        ceiling = self._ceiling(key)
        return min(self._caps.get(key, ceiling), ceiling)

    def shrink(self, key: BatchKey, failed_size: int) -> int:
        """A call of `failed_size` images ran out of memory: halve the cap (at least one) and
        start counting successful calls again. Returns the new cap."""
        self._caps[key] = max(1, failed_size // 2)
        self._calls_at_cap[key] = 0
        return self._caps[key]

    def succeeded(self, key: BatchKey) -> None:
        """A call of `key` went through: after enough of them a lowered cap grows by one, and
        is forgotten once it is back at the ceiling."""
        if key not in self._caps:
            return
        self._calls_at_cap[key] += 1
        if self._calls_at_cap[key] >= self._recovery_calls:
            self._calls_at_cap[key] = 0
            self._caps[key] += 1
            if self._caps[key] >= self._ceiling(key):
                del self._caps[key], self._calls_at_cap[key]


def share_of_last_call(
    batch: list[Job], speeds: Mapping[SpeedKey, float], other_free_in: float
) -> list[Job]:
    """The jobs of the queue's last call (`batch`, in turn order) this worker takes when another
    worker is free in `other_free_in` seconds, and takes the rest then: the first jobs that make
    the two calls end soonest, by the speeds measured so far. All of them when that is one call
    (the other worker is busy too long, or batching saves more), or nothing is measured yet.
    Without this, at the end of a burst, or for two members asking at once, one worker runs
    the whole call while another idles."""
    key = batch[0].request.batch_key
    counts = [job.request.count for job in batch]

    def seconds(images: int) -> float:
        per_step = seconds_per_step(speeds, SpeedKey(key.model, key.width * key.height, images))
        return math.inf if per_step is None else per_step * key.denoising_steps

    total, taken = sum(counts), 0
    best, soonest = len(batch), seconds(total)
    for jobs, count in enumerate(counts[:-1], start=1):
        taken += count
        ends = max(seconds(taken), other_free_in + seconds(total - taken))
        if ends < soonest:
            best, soonest = jobs, ends
    return batch[:best]
