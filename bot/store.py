"""SQLite, the source of truth: the only module that writes SQL.

One aiosqlite connection in autocommit mode; every transaction runs under one asyncio lock,
because aiosqlite serialises statements but not transactions, and two coroutines must never
interleave their BEGIN ... COMMIT on the same connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import aiosqlite

from bot.batching import form_batch
from bot.blocklist import find_blocked, normalize_term
from bot.eta import SpeedKey, blend
from bot.quota import WINDOW_SECONDS, MemberBanned, PromptBlocked, QuotaExceeded, QuotaStatus
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
    """
    CREATE TABLE ledger (
        id INTEGER PRIMARY KEY,
        guild_id INTEGER NOT NULL,
        member_id INTEGER NOT NULL,
        job_id INTEGER REFERENCES jobs(id) ON DELETE SET NULL,
        kind TEXT NOT NULL CHECK (kind IN ('charge', 'refund')),
        images INTEGER NOT NULL,
        window_at REAL NOT NULL,
        recorded_at REAL NOT NULL
    );
    CREATE UNIQUE INDEX ledger_once_per_job ON ledger (job_id, kind) WHERE job_id IS NOT NULL;
    CREATE INDEX ledger_by_member ON ledger (member_id, guild_id, window_at);
    CREATE TABLE member_quotas (
        guild_id INTEGER NOT NULL,
        member_id INTEGER NOT NULL,
        daily_limit INTEGER,
        reset_at REAL,
        UNIQUE (guild_id, member_id)
    );
    CREATE TABLE guild_settings (
        guild_id INTEGER NOT NULL,
        name TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (guild_id, name)
    );
    CREATE TABLE bans (
        guild_id INTEGER NOT NULL,
        member_id INTEGER NOT NULL,
        reason TEXT,
        moderator_id INTEGER NOT NULL,
        at REAL NOT NULL,
        UNIQUE (guild_id, member_id)
    );
    CREATE TABLE blocklist (
        guild_id INTEGER NOT NULL,
        term TEXT NOT NULL,
        normalized TEXT NOT NULL,
        moderator_id INTEGER NOT NULL,
        at REAL NOT NULL,
        PRIMARY KEY (guild_id, normalized)
    );
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY,
        guild_id INTEGER,
        moderator_id INTEGER NOT NULL,
        action TEXT NOT NULL,
        target_id INTEGER,
        detail TEXT,
        at REAL NOT NULL
    );
    """,
    """
    ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN parent_job_id INTEGER REFERENCES jobs(id) ON DELETE SET NULL;
    ALTER TABLE jobs ADD COLUMN parent_image_index INTEGER;
    ALTER TABLE jobs ADD COLUMN init_image_hash TEXT;
    CREATE TABLE speeds (
        model TEXT NOT NULL,
        pixels INTEGER NOT NULL,
        images INTEGER NOT NULL,
        seconds_per_step REAL NOT NULL,
        PRIMARY KEY (model, pixels, images)
    );
    CREATE TABLE member_defaults (
        member_id INTEGER PRIMARY KEY,
        steps INTEGER,
        width INTEGER,
        height INTEGER,
        scheduler TEXT,
        negative_prompt TEXT,
        count INTEGER,
        private INTEGER NOT NULL DEFAULT 0
    );
    """,
    """
    CREATE TABLE init_images (
        hash TEXT PRIMARY KEY,
        png BLOB NOT NULL,
        stored_at REAL NOT NULL
    );
    CREATE INDEX jobs_by_result ON jobs (result_message_id);
    """,
)

JOB_COLUMNS = (
    "id, member_id, guild_id, channel_id, prompt, negative_prompt, seed, count, steps, guidance,"
    " width, height, scheduler, model, mode, strength, status, queued_at, attempts, batch_id,"
    " init_image_hash, parent_job_id, parent_image_index"
)
JOB_FIELD_COUNT = JOB_COLUMNS.count(",") + 1


@dataclass(frozen=True)
class MemberDefaults:
    """A member's own defaults from /settings; None falls through to the server's."""

    steps: int | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    negative_prompt: str | None = None
    count: int | None = None
    private: bool = False


@dataclass(frozen=True)
class AuditEntry:
    moderator_id: int
    action: str
    target_id: int | None
    detail: str
    at: float


@dataclass(frozen=True)
class UsageStats:
    images_day: int
    images_week: int
    top_members: list[tuple[int, int]]
    mean_wait: float | None
    mean_generation: float | None
    busy_share: float


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
        init_image_hash=row[20],
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
        parent_job_id=row[21],
        parent_image_index=row[22],
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
        await db.execute("PRAGMA secure_delete=ON")  # deleted prompts are overwritten on disk
        store = cls(db, clock)
        await store._migrate()
        return store

    async def close(self) -> None:
        async with self._lock:
            await self._db.close()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE takes the write lock up front, so read-then-write cannot race.
        A caller cancelled anywhere inside (a shutdown) still leaves no transaction open:
        aiosqlite runs statements in order on its own thread, even those whose caller stopped
        waiting, so the ROLLBACK queued here runs after whatever it interrupted."""
        async with self._lock:
            try:
                await self._db.execute("BEGIN IMMEDIATE")
                yield self._db
            except BaseException:
                # "no transaction is active" when BEGIN itself failed.
                with contextlib.suppress(sqlite3.OperationalError):
                    await asyncio.shield(self._db.execute("ROLLBACK"))
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
        default_limit: int = 0,
        exempt: bool = False,
        parent: tuple[int, int] | None = None,
        init_png: bytes | None = None,
    ) -> Job:
        """Check the ban list, the blocklist and the quota, then write the job and its charge,
        all in one transaction: concurrent requests can never overspend, and a refused request
        leaves nothing behind. The job is written before anyone is told it is queued."""
        now = self._clock()
        guild = guild_id or 0
        async with self._transaction() as db:
            cursor = await db.execute(
                "SELECT reason FROM bans WHERE guild_id = ? AND member_id = ?", (guild, member_id)
            )
            if (ban := await cursor.fetchone()) is not None:
                raise MemberBanned(ban[0])
            cursor = await db.execute(
                "SELECT normalized FROM blocklist WHERE guild_id = ?", (guild,)
            )
            terms = [row[0] for row in await cursor.fetchall()]
            # Only the prompt: a blocked term in the negative prompt keeps it out of the image.
            if (blocked := find_blocked(request.prompt, terms)) is not None:
                raise PromptBlocked(blocked)
            status = await self._quota_status(db, guild, member_id, default_limit, exempt, now)
            if not status.allows(request.count):
                raise QuotaExceeded(status, request.count)
            if init_png is not None:  # kept so the job can run again after a restart
                await db.execute(
                    "INSERT OR IGNORE INTO init_images (hash, png, stored_at) VALUES (?, ?, ?)",
                    (request.init_image_hash, init_png, now),
                )
            cursor = await db.execute(
                """INSERT INTO jobs (member_id, guild_id, channel_id, interaction_id, prompt,
                       negative_prompt, seed, count, steps, guidance, width, height, scheduler,
                       model, mode, strength, queued_at, init_image_hash, parent_job_id,
                       parent_image_index)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
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
                    request.init_image_hash,
                    *(parent or (None, None)),
                ),
            )
            job_id = cursor.lastrowid
            await db.execute(
                """INSERT INTO ledger (guild_id, member_id, job_id, kind, images, window_at,
                       recorded_at)
                   VALUES (?, ?, ?, 'charge', ?, ?, ?)""",
                (guild, member_id, job_id, request.count, now, now),
            )
        parent_job_id, parent_index = parent or (None, None)
        return Job(
            job_id,
            member_id,
            guild_id,
            channel_id,
            request,
            "queued",
            now,
            parent_job_id=parent_job_id,
            parent_image_index=parent_index,
        )

    async def _quota_status(
        self,
        db: aiosqlite.Connection,
        guild: int,
        member_id: int,
        default_limit: int,
        exempt: bool,
        now: float,
    ) -> QuotaStatus:
        cursor = await db.execute(
            "SELECT daily_limit, reset_at FROM member_quotas WHERE guild_id = ? AND member_id = ?",
            (guild, member_id),
        )
        override, reset_at = await cursor.fetchone() or (None, None)
        cursor = await db.execute(
            "SELECT value FROM guild_settings WHERE guild_id = ? AND name = 'daily_limit'",
            (guild,),
        )
        guild_default = await cursor.fetchone()
        if override is not None:
            limit = override
        elif guild_default is not None:
            limit = int(guild_default[0])
        else:
            limit = default_limit
        since = max(now - WINDOW_SECONDS, reset_at or 0.0)
        cursor = await db.execute(
            """SELECT COALESCE(SUM(images), 0) FROM ledger
               WHERE guild_id = ? AND member_id = ? AND window_at > ?""",
            (guild, member_id, since),
        )
        (used,) = await cursor.fetchone()
        # The next image frees up when the oldest unrefunded charge leaves the window.
        cursor = await db.execute(
            """SELECT MIN(charge.window_at) FROM ledger AS charge
               WHERE charge.guild_id = ? AND charge.member_id = ? AND charge.kind = 'charge'
                 AND charge.window_at > ?
                 AND NOT EXISTS (SELECT 1 FROM ledger AS refund
                                 WHERE refund.job_id = charge.job_id AND refund.kind = 'refund')""",
            (guild, member_id, since),
        )
        (oldest,) = await cursor.fetchone()
        next_free = None if oldest is None else oldest + WINDOW_SECONDS
        return QuotaStatus(limit=limit, used=used, next_free_at=next_free, exempt=exempt)

    async def quota_status(
        self, guild_id: int | None, member_id: int, *, default_limit: int, exempt: bool = False
    ) -> QuotaStatus:
        async with self._lock:
            return await self._quota_status(
                self._db, guild_id or 0, member_id, default_limit, exempt, self._clock()
            )

    async def _refund(self, db: aiosqlite.Connection, job_id: int, now: float) -> None:
        """Give a job's images back, once: the unique index makes a second refund a no-op, also
        when a failure repeats after a restart."""
        await db.execute(
            """INSERT OR IGNORE INTO ledger (guild_id, member_id, job_id, kind, images, window_at,
                   recorded_at)
               SELECT guild_id, member_id, job_id, 'refund', -images, window_at, ?
               FROM ledger WHERE job_id = ? AND kind = 'charge'""",
            (now, job_id),
        )

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
            replace(job, status="running", attempts=job.attempts + 1, batch_id=batch_id)
            for job in batch
        ]

    async def finish_batch(self, batch_id: int) -> None:
        async with self._transaction() as db:
            await db.execute(
                "UPDATE batches SET finished_at = ? WHERE id = ?", (self._clock(), batch_id)
            )

    async def mark_done(self, job_id: int, *, withheld: int = 0) -> None:
        """A job whose every image was withheld by the safety checker is refunded."""
        now = self._clock()
        async with self._transaction() as db:
            cursor = await db.execute(
                """UPDATE jobs SET status = 'done', finished_at = ?, withheld = ?, error = NULL
                   WHERE id = ? RETURNING count""",
                (now, withheld, job_id),
            )
            row = await cursor.fetchone()
            if row is not None and withheld >= row[0]:
                await self._refund(db, job_id, now)

    async def mark_failed(self, job_id: int, error: str) -> None:
        now = self._clock()
        async with self._transaction() as db:
            await db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                (now, error, job_id),
            )
            await self._refund(db, job_id, now)

    async def record_delivery(
        self, job_id: int, channel_id: int, message_id: int, withheld: int = 0
    ) -> None:
        """Where a job's result was posted; recorded as soon as it is posted, so a job found
        running after a crash but already delivered is not run and posted again."""
        async with self._transaction() as db:
            await db.execute(
                """UPDATE jobs SET result_channel_id = ?, result_message_id = ?, withheld = ?
                   WHERE id = ?""",
                (channel_id, message_id, withheld, job_id),
            )

    async def recover_interrupted(self, max_attempts: int) -> tuple[int, list[Job]]:
        """After a crash: jobs left running whose result was already posted are done; the others
        go back to the queue in their original order, except those already claimed max_attempts
        times, which fail with a refund (a job that keeps killing the process must not take the
        bot down forever). Returns (requeued, failed)."""
        now = self._clock()
        async with self._transaction() as db:
            cursor = await db.execute(
                """UPDATE jobs SET status = 'done', finished_at = ?
                   WHERE status = 'running' AND result_message_id IS NOT NULL
                   RETURNING id, count, withheld""",
                (now,),
            )
            for job_id, count, withheld in await cursor.fetchall():
                if withheld >= count:
                    await self._refund(db, job_id, now)
            cursor = await db.execute(
                f"""UPDATE jobs SET status = 'failed', finished_at = ?, error = ?
                    WHERE status = 'running' AND attempts >= ? RETURNING {JOB_COLUMNS}""",
                (now, f"the bot stopped during this job {max_attempts} times", max_attempts),
            )
            failed = sorted(
                (_job_from_row(row) for row in await cursor.fetchall()), key=lambda job: job.id
            )
            for job in failed:
                await self._refund(db, job.id, now)
            cursor = await db.execute(
                "UPDATE jobs SET status = 'queued', started_at = NULL WHERE status = 'running'"
            )
            return cursor.rowcount, failed

    async def return_to_queue(self, job_ids: list[int]) -> None:
        """Put jobs that a shutdown interrupted back in the queue; the attempt does not count,
        since the job did nothing wrong."""
        async with self._transaction() as db:
            await db.executemany(
                """UPDATE jobs SET status = 'queued', started_at = NULL,
                       attempts = MAX(attempts - 1, 0)
                   WHERE id = ? AND status = 'running'""",
                [(job_id,) for job_id in job_ids],
            )

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
        return JobRecord(_job_from_row(row[:JOB_FIELD_COUNT]), *row[JOB_FIELD_COUNT:])

    async def count_jobs(self) -> int:
        async with self._lock:
            (count,) = await (await self._db.execute("SELECT COUNT(*) FROM jobs")).fetchone()
            return count

    # --- moderation -----------------------------------------------------------------------

    async def set_member_limit(self, guild_id: int, member_id: int, limit: int | None) -> None:
        """A per-member daily limit (None removes the override; 0 is unlimited)."""
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO member_quotas (guild_id, member_id, daily_limit) VALUES (?, ?, ?)
                   ON CONFLICT (guild_id, member_id)
                   DO UPDATE SET daily_limit = excluded.daily_limit""",
                (guild_id, member_id, limit),
            )

    async def reset_member_usage(self, guild_id: int, member_id: int) -> None:
        """Forget the member's usage so far; charges after now count again."""
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO member_quotas (guild_id, member_id, reset_at) VALUES (?, ?, ?)
                   ON CONFLICT (guild_id, member_id) DO UPDATE SET reset_at = excluded.reset_at""",
                (guild_id, member_id, self._clock()),
            )

    async def set_guild_limit(self, guild_id: int, limit: int) -> None:
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO guild_settings (guild_id, name, value) VALUES (?, 'daily_limit', ?)
                   ON CONFLICT (guild_id, name) DO UPDATE SET value = excluded.value""",
                (guild_id, str(limit)),
            )

    async def ban(
        self, guild_id: int, member_id: int, moderator_id: int, reason: str | None
    ) -> list[Job]:
        """Ban a member and cancel (and refund) their queued jobs; returns the cancelled jobs."""
        now = self._clock()
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO bans (guild_id, member_id, reason, moderator_id, at)
                   VALUES (?, ?, ?, ?, ?)
                   ON CONFLICT (guild_id, member_id) DO UPDATE
                   SET reason = excluded.reason, moderator_id = excluded.moderator_id""",
                (guild_id, member_id, reason, moderator_id, now),
            )
            return await self._cancel_queued(db, guild_id, member_id, now)

    async def unban(self, guild_id: int, member_id: int) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM bans WHERE guild_id = ? AND member_id = ?", (guild_id, member_id)
            )
            return cursor.rowcount > 0

    async def cancel_queued(self, guild_id: int, member_id: int | None = None) -> list[Job]:
        """Cancel and refund queued jobs in a server, of one member or of everyone."""
        async with self._transaction() as db:
            return await self._cancel_queued(db, guild_id, member_id, self._clock())

    async def _cancel_queued(
        self, db: aiosqlite.Connection, guild_id: int, member_id: int | None, now: float
    ) -> list[Job]:
        cursor = await db.execute(
            f"""UPDATE jobs SET status = 'cancelled', finished_at = ?
                WHERE status = 'queued' AND COALESCE(guild_id, 0) = ?
                  AND (? IS NULL OR member_id = ?)
                RETURNING {JOB_COLUMNS}""",
            (now, guild_id, member_id, member_id),
        )
        cancelled = [_job_from_row(row) for row in await cursor.fetchall()]
        for job in cancelled:
            await self._refund(db, job.id, now)
        return sorted(cancelled, key=lambda job: job.id)

    async def active_jobs(self, guild_id: int | None = None) -> list[Job]:
        """Running then queued jobs, in the order they will finish; all servers when None."""
        async with self._lock:
            cursor = await self._db.execute(
                f"""SELECT {JOB_COLUMNS} FROM jobs
                    WHERE status IN ('running', 'queued')
                      AND (? IS NULL OR COALESCE(guild_id, 0) = ?)
                    ORDER BY status = 'queued', queued_at, id""",
                (guild_id, guild_id),
            )
            return [_job_from_row(row) for row in await cursor.fetchall()]

    async def add_blocked_term(self, guild_id: int, term: str, moderator_id: int) -> bool:
        normalized = normalize_term(term)
        async with self._transaction() as db:
            cursor = await db.execute(
                """INSERT OR IGNORE INTO blocklist (guild_id, term, normalized, moderator_id, at)
                   VALUES (?, ?, ?, ?, ?)""",
                (guild_id, term, normalized, moderator_id, self._clock()),
            )
            return cursor.rowcount > 0

    async def remove_blocked_term(self, guild_id: int, term: str) -> bool:
        async with self._transaction() as db:
            cursor = await db.execute(
                "DELETE FROM blocklist WHERE guild_id = ? AND normalized = ?",
                (guild_id, normalize_term(term)),
            )
            return cursor.rowcount > 0

    async def blocked_terms(self, guild_id: int) -> list[str]:
        async with self._lock:
            cursor = await self._db.execute(
                "SELECT term FROM blocklist WHERE guild_id = ? ORDER BY normalized", (guild_id,)
            )
            return [row[0] for row in await cursor.fetchall()]

    async def record_audit(
        self, guild_id: int, moderator_id: int, action: str, target_id: int | None, detail: str
    ) -> None:
        async with self._transaction() as db:
            await db.execute(
                """INSERT INTO audit (guild_id, moderator_id, action, target_id, detail, at)
                   VALUES (?, ?, ?, ?, ?, ?)""",
                (guild_id, moderator_id, action, target_id, detail, self._clock()),
            )

    async def audit_log(self, guild_id: int, limit: int = 15) -> list[AuditEntry]:
        async with self._lock:
            cursor = await self._db.execute(
                """SELECT moderator_id, action, target_id, detail, at FROM audit
                   WHERE guild_id = ? ORDER BY id DESC LIMIT ?""",
                (guild_id, limit),
            )
            return [AuditEntry(*row) for row in await cursor.fetchall()]

    async def usage_stats(self, guild_id: int) -> UsageStats:
        """Images made, who made them, how long members waited, and how busy the device was."""
        now = self._clock()
        day, week = now - 86400, now - 7 * 86400
        async with self._lock:
            db = self._db
            images = []
            for since in (day, week):
                cursor = await db.execute(
                    """SELECT COALESCE(SUM(count - withheld), 0) FROM jobs
                       WHERE status = 'done' AND COALESCE(guild_id, 0) = ? AND finished_at > ?""",
                    (guild_id, since),
                )
                images.append((await cursor.fetchone())[0])
            cursor = await db.execute(
                """SELECT member_id, SUM(count - withheld) AS made FROM jobs
                   WHERE status = 'done' AND COALESCE(guild_id, 0) = ? AND finished_at > ?
                   GROUP BY member_id ORDER BY made DESC, member_id LIMIT 5""",
                (guild_id, week),
            )
            top = [(member, made) for member, made in await cursor.fetchall()]
            cursor = await db.execute(
                """SELECT AVG(started_at - queued_at), AVG(finished_at - started_at) FROM jobs
                   WHERE status = 'done' AND COALESCE(guild_id, 0) = ? AND finished_at > ?""",
                (guild_id, week),
            )
            mean_wait, mean_run = await cursor.fetchone()
            # The device is shared by every server, so busy time is over all batches.
            cursor = await db.execute(
                """SELECT COALESCE(SUM(MIN(finished_at, ?) - MAX(started_at, ?)), 0) FROM batches
                   WHERE finished_at > ?""",
                (now, day, day),
            )
            (busy,) = await cursor.fetchone()
        return UsageStats(images[0], images[1], top, mean_wait, mean_run, busy / 86400)

    # --- a member's own data --------------------------------------------------------------

    async def history(self, member_id: int, limit: int = 10) -> list[JobRecord]:
        async with self._lock:
            cursor = await self._db.execute(
                "SELECT id FROM jobs WHERE member_id = ? ORDER BY queued_at DESC, id DESC LIMIT ?",
                (member_id, limit),
            )
            ids = [row[0] for row in await cursor.fetchall()]
        return [record for job_id in ids if (record := await self.job(job_id)) is not None]

    async def forget_member(self, member_id: int) -> int:
        """Delete a member's jobs (prompts and parameters) everywhere; the ledger keeps bare image
        counts so quotas still hold. Running jobs block this: their rows are still in use.
        Returns the number of jobs deleted, or -1 when a job is running."""
        now = self._clock()
        async with self._transaction() as db:
            cursor = await db.execute(
                "SELECT 1 FROM jobs WHERE member_id = ? AND status = 'running'", (member_id,)
            )
            if await cursor.fetchone() is not None:
                return -1
            cursor = await db.execute(
                "SELECT id FROM jobs WHERE member_id = ? AND status = 'queued'", (member_id,)
            )
            for (job_id,) in await cursor.fetchall():
                await self._refund(db, job_id, now)
            cursor = await db.execute("DELETE FROM jobs WHERE member_id = ?", (member_id,))
            deleted = cursor.rowcount
            await db.execute("DELETE FROM member_defaults WHERE member_id = ?", (member_id,))
            await db.execute(
                """DELETE FROM init_images WHERE hash NOT IN
                   (SELECT init_image_hash FROM jobs WHERE init_image_hash IS NOT NULL)"""
            )
        # Move the deleted pages out of the write-ahead log too (secure_delete zeroes them).
        async with self._lock:
            await self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return deleted

    # --- speed, for ETAs --------------------------------------------------------------------

    async def record_speed(self, key: SpeedKey, seconds_per_step: float) -> None:
        """Blend a measurement into the stored moving average, which survives restarts."""
        async with self._transaction() as db:
            cursor = await db.execute(
                """SELECT seconds_per_step FROM speeds
                   WHERE model = ? AND pixels = ? AND images = ?""",
                (key.model, key.pixels, key.images),
            )
            row = await cursor.fetchone()
            value = blend(row[0] if row else None, seconds_per_step)
            await db.execute(
                """INSERT INTO speeds (model, pixels, images, seconds_per_step) VALUES (?, ?, ?, ?)
                   ON CONFLICT (model, pixels, images)
                   DO UPDATE SET seconds_per_step = excluded.seconds_per_step""",
                (key.model, key.pixels, key.images, value),
            )

    async def speeds(self) -> dict[SpeedKey, float]:
        async with self._lock:
            cursor = await self._db.execute(
                "SELECT model, pixels, images, seconds_per_step FROM speeds"
            )
            return {SpeedKey(m, p, i): v for m, p, i, v in await cursor.fetchall()}

    # --- cancelling -------------------------------------------------------------------------

    async def request_cancel(self, job_id: int) -> str:
        """A queued job is cancelled and refunded at once ("cancelled"); a running one is
        flagged so its images are dropped when the batch ends ("stopping"); anything else
        is past cancelling ("finished")."""
        now = self._clock()
        async with self._transaction() as db:
            cursor = await db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ? "
                "WHERE id = ? AND status = 'queued'",
                (now, job_id),
            )
            if cursor.rowcount:
                await self._refund(db, job_id, now)
                return "cancelled"
            cursor = await db.execute(
                "UPDATE jobs SET cancel_requested = 1 WHERE id = ? AND status = 'running'",
                (job_id,),
            )
            return "stopping" if cursor.rowcount else "finished"

    async def cancel_requested(self, job_ids: list[int]) -> set[int]:
        async with self._lock:
            cursor = await self._db.execute(
                f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN "
                f"({', '.join('?' * len(job_ids))})",
                job_ids,
            )
            return {row[0] for row in await cursor.fetchall()}

    async def mark_cancelled(self, job_id: int) -> None:
        """A running job whose member cancelled it: its images are dropped and it is refunded."""
        now = self._clock()
        async with self._transaction() as db:
            await db.execute(
                "UPDATE jobs SET status = 'cancelled', finished_at = ? WHERE id = ?",
                (now, job_id),
            )
            await self._refund(db, job_id, now)

    # --- member defaults --------------------------------------------------------------------

    async def member_defaults(self, member_id: int) -> MemberDefaults:
        async with self._lock:
            cursor = await self._db.execute(
                """SELECT steps, width, height, scheduler, negative_prompt, count, private
                   FROM member_defaults WHERE member_id = ?""",
                (member_id,),
            )
            row = await cursor.fetchone()
        if row is None:
            return MemberDefaults()
        return MemberDefaults(*row[:6], private=bool(row[6]))

    async def set_member_defaults(self, member_id: int, defaults: MemberDefaults) -> None:
        async with self._transaction() as db:
            await db.execute(
                """INSERT OR REPLACE INTO member_defaults
                       (member_id, steps, width, height, scheduler, negative_prompt, count, private)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    member_id,
                    defaults.steps,
                    defaults.width,
                    defaults.height,
                    defaults.scheduler,
                    defaults.negative_prompt,
                    defaults.count,
                    int(defaults.private),
                ),
            )

    # --- init images ------------------------------------------------------------------------

    async def init_image(self, digest: str) -> bytes | None:
        async with self._lock:
            cursor = await self._db.execute("SELECT png FROM init_images WHERE hash = ?", (digest,))
            row = await cursor.fetchone()
        return None if row is None else row[0]

    async def job_for_message(self, message_id: int) -> JobRecord | None:
        """The job whose result was posted as `message_id` (for buttons, replies, Vary)."""
        async with self._lock:
            cursor = await self._db.execute(
                "SELECT id FROM jobs WHERE result_message_id = ?", (message_id,)
            )
            row = await cursor.fetchone()
        return None if row is None else await self.job(row[0])
