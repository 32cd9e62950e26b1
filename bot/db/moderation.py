"""What moderators control and see: bans, the prompt blocklist, the audit log, usage stats."""

from __future__ import annotations

from dataclasses import dataclass

from bot.blocklist import find_blocked, normalize_term
from bot.db import jobs
from bot.db.connection import Tx
from bot.requests import Job

DAY = 86400


@dataclass(frozen=True)
class Ban:
    reason: str | None


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


# --- bans ----------------------------------------------------------------------------------


async def ban(
    tx: Tx, guild_id: int, member_id: int, moderator_id: int, reason: str | None
) -> list[Job]:
    """Ban a member and cancel (and refund) their queued jobs; returns the cancelled jobs."""
    await tx.run(
        """INSERT INTO bans (guild_id, member_id, reason, moderator_id, at) VALUES (?, ?, ?, ?, ?)
           ON CONFLICT (guild_id, member_id) DO UPDATE
           SET reason = excluded.reason, moderator_id = excluded.moderator_id""",
        (guild_id, member_id, reason, moderator_id, tx.now),
    )
    return await jobs.cancel_queued(tx, guild_id, member_id)


async def unban(tx: Tx, guild_id: int, member_id: int) -> bool:
    cursor = await tx.run(
        "DELETE FROM bans WHERE guild_id = ? AND member_id = ?", (guild_id, member_id)
    )
    return cursor.rowcount > 0


async def ban_of(tx: Tx, guild_id: int, member_id: int) -> Ban | None:
    row = await tx.one(
        "SELECT reason FROM bans WHERE guild_id = ? AND member_id = ?", (guild_id, member_id)
    )
    return None if row is None else Ban(row["reason"])


# --- the blocklist -------------------------------------------------------------------------


async def _stored_keys(tx: Tx, guild_id: int, term: str) -> list[str]:
    """The stored keys that fold to `term`'s key: rows written before a folding rule was added
    (`núde` before accents were dropped) still count as the same term."""
    key = normalize_term(term)
    rows = await tx.all("SELECT normalized FROM blocklist WHERE guild_id = ?", (guild_id,))
    return [row["normalized"] for row in rows if normalize_term(row["normalized"]) == key]


async def add_blocked_term(tx: Tx, guild_id: int, term: str, moderator_id: int) -> bool:
    if await _stored_keys(tx, guild_id, term):
        return False
    await tx.run(
        """INSERT INTO blocklist (guild_id, term, normalized, moderator_id, at)
           VALUES (?, ?, ?, ?, ?)""",
        (guild_id, term, normalize_term(term), moderator_id, tx.now),
    )
    return True


async def remove_blocked_term(tx: Tx, guild_id: int, term: str) -> bool:
    stored = await _stored_keys(tx, guild_id, term)
    await tx.run_many(
        "DELETE FROM blocklist WHERE guild_id = ? AND normalized = ?",
        [(guild_id, key) for key in stored],
    )
    return bool(stored)


async def blocked_terms(tx: Tx, guild_id: int) -> list[str]:
    rows = await tx.all(
        "SELECT term FROM blocklist WHERE guild_id = ? ORDER BY normalized", (guild_id,)
    )
    return [row["term"] for row in rows]


async def blocked_keys(tx: Tx, guild_id: int) -> list[str]:
    """The server's blocked terms as matched: normalized."""
    rows = await tx.all("SELECT normalized FROM blocklist WHERE guild_id = ?", (guild_id,))
    return [row["normalized"] for row in rows]


async def blocked_term_in(tx: Tx, guild_id: int, prompt: str) -> str | None:
    """The server's first blocked term that `prompt` spells, or None."""
    return find_blocked(prompt, await blocked_keys(tx, guild_id))


# --- audit and stats -----------------------------------------------------------------------


async def record_audit(
    tx: Tx, guild_id: int, moderator_id: int, action: str, target_id: int | None, detail: str
) -> None:
    await tx.run(
        """INSERT INTO audit (guild_id, moderator_id, action, target_id, detail, at)
           VALUES (?, ?, ?, ?, ?, ?)""",
        (guild_id, moderator_id, action, target_id, detail, tx.now),
    )


async def audit_log(tx: Tx, guild_id: int, limit: int = 15) -> list[AuditEntry]:
    rows = await tx.all(
        """SELECT moderator_id, action, target_id, detail, at FROM audit
           WHERE guild_id = ? ORDER BY id DESC LIMIT ?""",
        (guild_id, limit),
    )
    return [AuditEntry(**dict(row)) for row in rows]


async def active_jobs_in(tx: Tx, guild_id: int, member_id: int) -> int:
    """The member's jobs queued or running in one server: a moderator sees only their own."""
    return await tx.value(
        """SELECT COUNT(*) FROM jobs WHERE member_id = ? AND status IN ('queued', 'running')
           AND COALESCE(guild_id, 0) = ?""",
        (member_id, guild_id),
    )


async def usage_stats(tx: Tx, guild_id: int) -> UsageStats:
    """Images made, who made them, how long members waited, and how busy the device was."""
    day, week = tx.now - DAY, tx.now - 7 * DAY
    done_since = "status = 'done' AND COALESCE(guild_id, 0) = ? AND finished_at > ?"
    images_day, images_week = [
        await tx.value(
            f"SELECT COALESCE(SUM(count - withheld), 0) FROM jobs WHERE {done_since}",
            (guild_id, since),
        )
        for since in (day, week)
    ]
    top = await tx.all(
        f"""SELECT member_id, SUM(count - withheld) AS made FROM jobs WHERE {done_since}
            GROUP BY member_id ORDER BY made DESC, member_id LIMIT 5""",
        (guild_id, week),
    )
    times = await tx.one(
        f"""SELECT AVG(started_at - queued_at) AS wait, AVG(finished_at - started_at) AS run
            FROM jobs WHERE {done_since}""",
        (guild_id, week),
    )
    # The device is shared by every server, so busy time is over all batches.
    busy = await tx.value(
        """SELECT COALESCE(SUM(MIN(finished_at, ?) - MAX(started_at, ?)), 0) FROM batches
           WHERE finished_at > ?""",
        (tx.now, day, day),
    )
    return UsageStats(
        images_day,
        images_week,
        [(row["member_id"], row["made"]) for row in top],
        times["wait"],
        times["run"],
        busy / DAY,
    )
