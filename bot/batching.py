"""The batch former: which pending jobs share the next diffusers call.

Pure and deterministic so the fairness rules can be tested without torch or SQLite.
"""

from __future__ import annotations

from collections.abc import Sequence

from bot.requests import Job


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
