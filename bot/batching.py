"""The batch former (which pending jobs share the next diffusers call) and the batch caps
(how many images one call of a key may hold after out-of-memory errors).

Pure and deterministic so the fairness and memory rules can be tested without torch or SQLite.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bot.requests import BatchKey, Job

# Successful calls at a lowered cap before it is raised by one image again.
CAP_RECOVERY_CALLS = 4


def form_batch(pending: Sequence[Job], max_images: int) -> list[Job]:
    """Take the oldest pending job, then every later job with the same batch key while the
    images fit under max_images. The oldest job always goes first, even when it alone is
    larger than the cap (the executor then runs it in slices), so nobody starves."""
    if not pending:
        return []
    ordered = sorted(pending, key=lambda job: (job.queued_at, job.id))
    first = ordered[0]
    key = first.request.batch_key
    batch = [first]
    images = first.request.count
    for job in ordered[1:]:
        if images >= max_images:
            break
        if job.request.batch_key == key and images + job.request.count <= max_images:
            batch.append(job)
            images += job.request.count
    return batch


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
