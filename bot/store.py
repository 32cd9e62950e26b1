"""SQLite, the source of truth: the only module that writes SQL.

One aiosqlite connection in autocommit mode; every transaction runs under one asyncio lock,
because aiosqlite serialises statements but not transactions, and two coroutines must never
interleave their BEGIN ... COMMIT on the same connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from bot.batching import form_batch
from bot.requests import GenerationRequest, Job

# Each entry moves the schema from version i to i+1; PRAGMA user_version records where we are.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        member_id INTEGER NOT NULL,
        guild_id INTEGER,
        channel_id INTEGER,
        interaction_id INTEGER,
        status_message_id INTEGER,
        prompt TEXT NOT NULL,
        negative_prompt TEXT NOT NULL DEFAULT '',
        seed INTEGER NOT NULL,
        count INTEGER NOT NULL,
        steps INTEGER NOT NULL,
        guidance REAL NOT NULL,
        width INTEGER NOT NULL,
        height INTEGER NOT NULL,
        scheduler TEXT NOT NULL,
        model TEXT NOT NULL,
        mode TEXT NOT NULL DEFAULT 'text',
        strength REAL,
        status TEXT NOT NULL DEFAULT 'queued'
            CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
        queued_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        batch_id INTEGER REFERENCES batches(id),
        batch_size INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        withheld INTEGER NOT NULL DEFAULT 0,
        error TEXT,
        result_channel_id INTEGER,
        result_message_id INTEGER
    );
    CREATE INDEX jobs_by_status ON jobs (status, queued_at, id);
    CREATE INDEX jobs_by_member ON jobs (member_id, queued_at);
    CREATE TABLE batches (
        id INTEGER PRIMARY KEY,
        model TEXT NOT NULL,
        images INTEGER NOT NULL,
        started_at REAL NOT NULL,
        finished_at REAL
    );
    """,
)

JOB_COLUMNS = (
    "id, member_id, guild_id, channel_id, prompt, negative_prompt, seed, count, steps, guidance,"
    " width, height, scheduler, model, mode, strength, status, queued_at, attempts, batch_id"
)


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


def _job_from_row(row: Sequence) -> Job:
    request = GenerationRequest(
        prompt=row[4],
        negative_prompt=row[5],
        seed=row[6],
        count=row[7],
        steps=row[8],
        guidance=row[9],
        width=row[10],
        height=row[11],
        scheduler=row[12],
        model=row[13],
        mode=row[14],
        strength=row[15],
    )
    return Job(
        id=row[0],
        member_id=row[1],
        guild_id=row[2],
        channel_id=row[3],
        request=request,
        status=row[16],
        queued_at=row[17],
        attempts=row[18],
        batch_id=row[19],
    )


class Store:
    """Jobs and batches in SQLite. Open with `await Store.open(path)`; close with `close()`."""

    def __init__(self, db: aiosqlite.Connection, clock: Callable[[], float]) -> None:
        self._db = db
        self._clock = clock
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str, clock: Callable[[], float] = time.time) -> Store:
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(str(path), isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA foreign_keys=ON")
        await db.execute("PRAGMA busy_timeout=5000")
        await db.execute("PRAGMA synchronous=NORMAL")
        store = cls(db, clock)
        await store._migrate()
        return store

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE takes the write lock up front, so read-then-write cannot race."""
        async with self._lock:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")

    async def _migrate(self) -> None:
        async with self._lock:
            (version,) = await (await self._db.execute("PRAGMA user_version")).fetchone()
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                # executescript commits on its own, so the version bump rides inside the script
                await self._db.executescript(
                    f"BEGIN IMMEDIATE; {script}; PRAGMA user_version = {number}; COMMIT;"
                )

    async def schema_version(self) -> int:
        (version,) = await (await self._db.execute("PRAGMA user_version")).fetchone()
        return version

    async def admit(
        self,
        request: GenerationRequest,
        *,
        member_id: int,
        guild_id: int | None,
        channel_id: int | None,
        interaction_id: int | None = None,
    ) -> Job:
        """Write the job before anyone is told it is queued."""
        now = self._clock()
        async with self._transaction() as db:
            cursor = await db.execute(
                """INSERT INTO jobs (member_id, guild_id, channel_id, interaction_id, prompt,
                       negative_prompt, seed, count, steps, guidance, width, height, scheduler,
                       model, mode, strength, queued_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    member_id,
                    guild_id,
                    channel_id,
                    interaction_id,
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
                    now,
                ),
            )
            job_id = cursor.lastrowid
        return Job(job_id, member_id, guild_id, channel_id, request, "queued", now)

    async def pending_jobs(self) -> list[Job]:
        """Queued jobs, oldest first."""
        async with self._lock:
            cursor = await self._db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'queued' ORDER BY queued_at, id"
            )
            return [_job_from_row(row) for row in await cursor.fetchall()]

    async def queue_position(self, job_id: int) -> int:
        """1 for the next job to run; 0 when the job is already running or finished."""
        async with self._lock:
            cursor = await self._db.execute(
                """SELECT COUNT(*) FROM jobs AS other, jobs AS mine
                   WHERE mine.id = ? AND mine.status = 'queued' AND other.status = 'queued'
                     AND (other.queued_at, other.id) <= (mine.queued_at, mine.id)""",
                (job_id,),
            )
            (position,) = await cursor.fetchone()
            return position

    async def claim_batch(self, max_images: int) -> tuple[int, list[Job]] | None:
        """Mark the next batch running in one transaction and return (batch id, jobs)."""
        now = self._clock()
        async with self._transaction() as db:
            cursor = await db.execute(
                f"SELECT {JOB_COLUMNS} FROM jobs WHERE status = 'queued' ORDER BY queued_at, id"
            )
            pending = [_job_from_row(row) for row in await cursor.fetchall()]
            batch = form_batch(pending, max_images)
            if not batch:
                return None
            images = sum(job.request.count for job in batch)
            cursor = await db.execute(
                "INSERT INTO batches (model, images, started_at) VALUES (?, ?, ?)",
                (batch[0].request.model, images, now),
            )
            batch_id = cursor.lastrowid
            await db.executemany(
                """UPDATE jobs SET status = 'running', started_at = ?, batch_id = ?,
                       batch_size = ?, attempts = attempts + 1
                   WHERE id = ?""",
                [(now, batch_id, images, job.id) for job in batch],
            )
        return batch_id, [
            Job(
                j.id,
                j.member_id,
                j.guild_id,
                j.channel_id,
                j.request,
                "running",
                j.queued_at,
                j.attempts + 1,
                batch_id,
            )
            for j in batch
        ]

    async def finish_batch(self, batch_id: int) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE batches SET finished_at = ? WHERE id = ?", (self._clock(), batch_id)
            )

    async def mark_done(self, job_id: int, *, withheld: int = 0) -> None:
        async with self._transaction() as db:
            await db.execute(
                """UPDATE jobs SET status = 'done', finished_at = ?, withheld = ?, error = NULL
                   WHERE id = ?""",
                (self._clock(), withheld, job_id),
            )

    async def mark_failed(self, job_id: int, error: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                (self._clock(), error, job_id),
            )

    async def record_delivery(self, job_id: int, channel_id: int, message_id: int) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE jobs SET result_channel_id = ?, result_message_id = ? WHERE id = ?",
                (channel_id, message_id, job_id),
            )

    async def record_status_message(self, job_id: int, message_id: int) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE jobs SET status_message_id = ? WHERE id = ?", (message_id, job_id)
            )

    async def requeue_interrupted(self) -> int:
        """Jobs left running by a stopped process go back to the queue in their original order."""
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL WHERE status = 'running'"
            )
            return cursor.rowcount

    async def job(self, job_id: int) -> JobRecord | None:
        async with self._lock:
            cursor = await self._db.execute(
                f"""SELECT {JOB_COLUMNS}, started_at, finished_at, batch_size, withheld, error,
                        result_channel_id, result_message_id, interaction_id
                    FROM jobs WHERE id = ?""",
                (job_id,),
            )
            row = await cursor.fetchone()
        if row is None:
            return None
        return JobRecord(_job_from_row(row[:20]), *row[20:])

    async def count_jobs(self) -> int:
        async with self._lock:
            (count,) = await (await self._db.execute("SELECT COUNT(*) FROM jobs")).fetchone()
            return count
