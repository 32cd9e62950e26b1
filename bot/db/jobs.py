"""The queue: a job's life from queued to done, failed or cancelled, and the batches it ran in.

The jobs table is the queue; the executor only ever claims from it. Every function takes an
open transaction (see `bot.db.connection`).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, replace
from enum import Enum

from bot.db import quotas
from bot.db.connection import Tx
from bot.intake import Intake
from bot.requests import GenerationRequest, Job, JobStatus

JOB_COLUMNS = (
    "id, member_id, guild_id, channel_id, prompt, negative_prompt, seed, count, steps, guidance,"
    " width, height, scheduler, model, mode, strength, status, queued_at, attempts, batch_id,"
    " init_image_hash, parent_job_id, parent_image_index, weight, loras, keep_box, operation"
)
RECORD_COLUMNS = (
    f"{JOB_COLUMNS}, started_at, finished_at, batch_size, withheld, error, result_channel_id,"
    " result_message_id, interaction_id"
)


class CancelOutcome(Enum):
    """What a cancel request did: a queued job is cancelled and refunded at once, a running one
    stops when its batch ends, anything else is past cancelling."""

    CANCELLED = "cancelled"
    STOPPING = "stopping"
    FINISHED = "finished"


@dataclass(frozen=True)
class JobRecord:
    """Everything the store knows about a job, for history, delivery and tests."""

    job: Job
    started_at: float | None
    finished_at: float | None
    batch_size: int | None
    withheld: int
    error: str | None
    result_channel_id: int | None
    result_message_id: int | None
    interaction_id: int | None


def job_from_row(row: sqlite3.Row) -> Job:
    """A job as its row stores it, request and all."""
    request = GenerationRequest(
        prompt=row["prompt"],
        negative_prompt=row["negative_prompt"],
        seed=row["seed"],
        count=row["count"],
        steps=row["steps"],
        guidance=row["guidance"],
        width=row["width"],
        height=row["height"],
        scheduler=row["scheduler"],
        model=row["model"],
        mode=row["mode"],
        strength=row["strength"],
        init_image_hash=row["init_image_hash"],
        loras=tuple((name, float(weight)) for name, weight in json.loads(row["loras"])),
        keep_box=tuple(json.loads(row["keep_box"])) if row["keep_box"] else None,
        operation=row["operation"],
    )
    return Job(
        id=row["id"],
        member_id=row["member_id"],
        guild_id=row["guild_id"],
        channel_id=row["channel_id"],
        request=request,
        status=JobStatus(row["status"]),
        queued_at=row["queued_at"],
        attempts=row["attempts"],
        batch_id=row["batch_id"],
        parent_job_id=row["parent_job_id"],
        parent_image_index=row["parent_image_index"],
        weight=row["weight"],
    )


def _record_from_row(row: sqlite3.Row) -> JobRecord:
    return JobRecord(
        job=job_from_row(row),
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        batch_size=row["batch_size"],
        withheld=row["withheld"],
        error=row["error"],
        result_channel_id=row["result_channel_id"],
        result_message_id=row["result_message_id"],
        interaction_id=row["interaction_id"],
    )


def _jobs_by_id(rows: list[sqlite3.Row]) -> list[Job]:
    return sorted(map(job_from_row, rows), key=lambda job: job.id)


# --- reading -------------------------------------------------------------------------------


async def get(tx: Tx, job_id: int) -> JobRecord | None:
    row = await tx.one(f"SELECT {RECORD_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
    return None if row is None else _record_from_row(row)


async def for_message(tx: Tx, message_id: int) -> JobRecord | None:
    """The job whose result was posted as `message_id` (for buttons, replies, Vary)."""
    row = await tx.one(
        f"SELECT {RECORD_COLUMNS} FROM jobs WHERE result_message_id = ?", (message_id,)
    )
    return None if row is None else _record_from_row(row)


async def of_member(tx: Tx, member_id: int, limit: int) -> list[JobRecord]:
    """A member's newest jobs first."""
    rows = await tx.all(
        f"""SELECT {RECORD_COLUMNS} FROM jobs WHERE member_id = ?
            ORDER BY queued_at DESC, id DESC LIMIT ?""",
        (member_id, limit),
    )
    return [_record_from_row(row) for row in rows]


async def pending(tx: Tx) -> list[Job]:
    """Queued jobs, oldest first."""
    rows = await tx.all(
        f"SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'queued' ORDER BY queued_at, id"
    )
    return [job_from_row(row) for row in rows]


async def running(tx: Tx, guild_id: int | None = None) -> list[Job]:
    """Jobs on the device now (a call or two's worth); all servers when None. Queued jobs are
    read from the queue index, which knows their order."""
    rows = await tx.all(
        f"""SELECT {JOB_COLUMNS} FROM jobs
            WHERE status = 'running' AND (? IS NULL OR COALESCE(guild_id, 0) = ?)
            ORDER BY started_at, id""",
        (guild_id, guild_id),
    )
    return [job_from_row(row) for row in rows]


async def any_queued(tx: Tx) -> bool:
    return bool(await tx.value("SELECT EXISTS (SELECT 1 FROM jobs WHERE status = 'queued')"))


async def count(tx: Tx) -> int:
    return await tx.value("SELECT COUNT(*) FROM jobs")


async def init_image(tx: Tx, digest: str) -> bytes | None:
    return await tx.value("SELECT png FROM init_images WHERE hash = ?", (digest,))


async def cancel_requested(tx: Tx, job_ids: list[int]) -> set[int]:
    marks = ", ".join("?" * len(job_ids))
    rows = await tx.all(
        f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN ({marks})", job_ids
    )
    return {row["id"] for row in rows}


# --- the lifecycle -------------------------------------------------------------------------


async def insert(
    tx: Tx, request: GenerationRequest, source: Intake, init_png: bytes | None = None
) -> Job:
    """Write a queued job from `source` (and its init image, so it can run again after a
    restart)."""
    if init_png is not None:
        await tx.run(
            "INSERT OR IGNORE INTO init_images (hash, png, stored_at) VALUES (?, ?, ?)",
            (request.init_image_hash, init_png, tx.now),
        )
    parent_job_id, parent_index = source.parent or (None, None)
    cursor = await tx.run(
        """INSERT INTO jobs (member_id, guild_id, channel_id, interaction_id, prompt,
               negative_prompt, seed, count, steps, guidance, width, height, scheduler,
               model, mode, strength, queued_at, init_image_hash, parent_job_id,
               parent_image_index, weight, loras, keep_box, operation)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            source.member_id,
            source.guild_id,
            source.channel_id,
            source.interaction_id,
            request.prompt,
            request.negative_prompt,
            request.seed,
            request.count,
            request.steps,
            request.guidance,
            request.width,
            request.height,
            request.scheduler,
            request.model,
            request.mode,
            request.strength,
            tx.now,
            request.init_image_hash,
            parent_job_id,
            parent_index,
            source.weight,
            json.dumps([list(lora) for lora in request.loras]),
            None if request.keep_box is None else json.dumps(list(request.keep_box)),
            request.operation,
        ),
    )
    return Job(
        cursor.lastrowid,
        source.member_id,
        source.guild_id,
        source.channel_id,
        request,
        JobStatus.QUEUED,
        tx.now,
        parent_job_id=parent_job_id,
        parent_image_index=parent_index,
        weight=source.weight,
    )


async def claim_batch(tx: Tx, job_ids: list[int]) -> tuple[int, list[Job]] | None:
    """Mark the chosen jobs running, in one transaction that re-checks each is still queued;
    returns (batch id, the jobs claimed, in the order asked), or None when none still was.
    Reads only the rows it takes, however long the queue."""
    marks = ", ".join("?" * len(job_ids))
    # By primary key only: filtering on status in SQL lets the planner walk the status
    # index, which is the whole queue.
    rows = await tx.all(f"SELECT {JOB_COLUMNS} FROM jobs WHERE id IN ({marks})", job_ids)
    found = {row["id"]: job_from_row(row) for row in rows if row["status"] == "queued"}
    if not found:
        return None
    batch = [found[job_id] for job_id in job_ids if job_id in found]
    images = sum(job.request.count for job in batch)
    cursor = await tx.run(
        "INSERT INTO batches (model, images, started_at) VALUES (?, ?, ?)",
        (batch[0].request.model, images, tx.now),
    )
    batch_id = cursor.lastrowid
    await tx.run_many(
        """UPDATE jobs SET status = 'running', started_at = ?, batch_id = ?, batch_size = ?,
               attempts = attempts + 1
           WHERE id = ?""",
        [(tx.now, batch_id, images, job.id) for job in batch],
    )
    return batch_id, [
        replace(job, status=JobStatus.RUNNING, attempts=job.attempts + 1, batch_id=batch_id)
        for job in batch
    ]


async def finish_batch(tx: Tx, batch_id: int) -> None:
    await tx.run("UPDATE batches SET finished_at = ? WHERE id = ?", (tx.now, batch_id))


async def mark_done(tx: Tx, job_id: int, withheld: int = 0) -> None:
    """A job whose every image was withheld by the safety checker is refunded."""
    images = await tx.value(
        """UPDATE jobs SET status = 'done', finished_at = ?, withheld = ?, error = NULL
           WHERE id = ? RETURNING count""",
        (tx.now, withheld, job_id),
    )
    if images is not None and withheld >= images:
        await quotas.refund(tx, job_id)


async def mark_failed(tx: Tx, job_id: int, error: str) -> None:
    await tx.run(
        "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
        (tx.now, error, job_id),
    )
    await quotas.refund(tx, job_id)


async def mark_cancelled(tx: Tx, job_id: int) -> None:
    """A running job whose member cancelled it: its images are dropped and it is refunded."""
    await tx.run(
        "UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ?", (tx.now, job_id)
    )
    await quotas.refund(tx, job_id)


async def record_delivery(
    tx: Tx, job_id: int, channel_id: int, message_id: int, withheld: int = 0
) -> None:
    """Where a job's result was posted; recorded as soon as it is posted, so a job found
    running after a crash but already delivered is not run and posted again."""
    await tx.run(
        """UPDATE jobs SET result_channel_id = ?, result_message_id = ?, withheld = ?
           WHERE id = ?""",
        (channel_id, message_id, withheld, job_id),
    )


async def recover_interrupted(tx: Tx, max_attempts: int) -> tuple[int, list[Job]]:
    """After a crash: jobs left running whose result was already posted are done; the others
    go back to the queue in their original order, except those already claimed max_attempts
    times, which fail with a refund (a job that keeps killing the process must not take the
    bot down forever). Returns (requeued, failed)."""
    delivered = await tx.all(
        """UPDATE jobs SET status = 'done', finished_at = ?
           WHERE status = 'running' AND result_message_id IS NOT NULL
           RETURNING id, count, withheld""",
        (tx.now,),
    )
    for row in delivered:
        if row["withheld"] >= row["count"]:
            await quotas.refund(tx, row["id"])
    failed = _jobs_by_id(
        await tx.all(
            f"""UPDATE jobs SET status = 'failed', finished_at = ?, error = ?
                WHERE status = 'running' AND attempts >= ? RETURNING {JOB_COLUMNS}""",
            (tx.now, f"the bot stopped during this job {max_attempts} times", max_attempts),
        )
    )
    for job in failed:
        await quotas.refund(tx, job.id)
    cursor = await tx.run(
        "UPDATE jobs SET status = 'queued', started_at = NULL WHERE status = 'running'"
    )
    return cursor.rowcount, failed


async def return_to_queue(tx: Tx, job_ids: list[int], *, count_attempt: bool = False) -> None:
    """Put jobs that a shutdown interrupted back in the queue; the attempt does not count,
    since the job did nothing wrong. A worker lost mid-call counts it (`count_attempt`), as a
    crash does: a job that keeps killing workers must fail in the end."""
    await tx.run_many(
        """UPDATE jobs SET status = 'queued', started_at = NULL,
               attempts = CASE WHEN ? THEN attempts ELSE MAX(attempts - 1, 0) END
           WHERE id = ? AND status = 'running'""",
        [(count_attempt, job_id) for job_id in job_ids],
    )


# --- cancelling ----------------------------------------------------------------------------


async def request_cancel(tx: Tx, job_id: int) -> CancelOutcome:
    """Cancel and refund a queued job at once; flag a running one, whose images are dropped
    when its batch ends."""
    cursor = await tx.run(
        "UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ? AND status = 'queued'",
        (tx.now, job_id),
    )
    if cursor.rowcount:
        await quotas.refund(tx, job_id)
        return CancelOutcome.CANCELLED
    cursor = await tx.run(
        "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'", (job_id,)
    )
    return CancelOutcome.STOPPING if cursor.rowcount else CancelOutcome.FINISHED


async def cancel_queued(tx: Tx, guild_id: int, member_id: int | None = None) -> list[Job]:
    """Cancel and refund queued jobs in a server, of one member or of everyone."""
    cancelled = _jobs_by_id(
        await tx.all(
            f"""UPDATE jobs SET status = 'cancelled', finished_at = ?
                WHERE status = 'queued' AND COALESCE(guild_id, 0) = ?
                  AND (? IS NULL OR member_id = ?)
                RETURNING {JOB_COLUMNS}""",
            (tx.now, guild_id, member_id, member_id),
        )
    )
    for job in cancelled:
        await quotas.refund(tx, job.id)
    return cancelled
