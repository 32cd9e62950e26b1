"""The quota ledger: a charge when a job is admitted, at most one refund when it fails, is
cancelled or is wholly withheld; limits per member and per server over a rolling 24 hours.

Amounts are cost units (`bot/quota.py`): the ledger stores them as integer thousandths
(`milliunits`), so sums stay exact; limits are stored as units, as moderators typed them."""

from __future__ import annotations

from bot.db.connection import Tx
from bot.quota import MILLI, WINDOW_SECONDS, QuotaStatus, milliunits


async def charge(tx: Tx, guild_id: int, member_id: int, job_id: int, cost: float) -> None:
    """Charge a job's cost, in units."""
    await tx.run(
        """INSERT INTO ledger (guild_id, member_id, job_id, kind, milliunits, window_at,
               recorded_at)
           VALUES (?, ?, ?, 'charge', ?, ?, ?)""",
        (guild_id, member_id, job_id, milliunits(cost), tx.now, tx.now),
    )


async def refund(tx: Tx, job_id: int) -> None:
    """Give a job's charge back, once: the unique index makes a second refund a no-op, also
    when a failure repeats after a restart."""
    await tx.run(
        """INSERT OR IGNORE INTO ledger (guild_id, member_id, job_id, kind, milliunits,
               window_at, recorded_at)
           SELECT guild_id, member_id, job_id, 'refund', -milliunits, window_at, ?
           FROM ledger WHERE job_id = ? AND kind = 'charge'""",
        (tx.now, job_id),
    )


async def status(
    tx: Tx, guild_id: int | None, member_id: int, *, default_limit: float, exempt: bool = False
) -> QuotaStatus:
    """The member's limit in units (their override, else the server's, else `default_limit`)
    and the units they used in the window since their last reset."""
    guild = guild_id or 0
    override = await tx.one(
        "SELECT daily_limit, reset_at FROM member_quotas WHERE guild_id = ? AND member_id = ?",
        (guild, member_id),
    )
    server_limit = await tx.value(
        "SELECT value FROM guild_settings WHERE guild_id = ? AND name = 'daily_limit'", (guild,)
    )
    if override is not None and override["daily_limit"] is not None:
        limit = override["daily_limit"]
    elif server_limit is not None:
        limit = float(server_limit)
    else:
        limit = default_limit
    reset_at = override["reset_at"] if override is not None else None
    since = max(tx.now - WINDOW_SECONDS, reset_at or 0.0)
    used = await tx.value(
        """SELECT COALESCE(SUM(milliunits), 0) FROM ledger
           WHERE guild_id = ? AND member_id = ? AND window_at > ?""",
        (guild, member_id, since),
    )
    # Units free up when the oldest unrefunded charge leaves the window.
    oldest = await tx.value(
        """SELECT MIN(charge.window_at) FROM ledger AS charge
           WHERE charge.guild_id = ? AND charge.member_id = ? AND charge.kind = 'charge'
             AND charge.window_at > ?
             AND NOT EXISTS (SELECT 1 FROM ledger AS refund
                             WHERE refund.job_id = charge.job_id AND refund.kind = 'refund')""",
        (guild, member_id, since),
    )
    next_free = None if oldest is None else oldest + WINDOW_SECONDS
    return QuotaStatus(limit=limit, used=used / MILLI, next_free_at=next_free, exempt=exempt)


async def set_member_limit(tx: Tx, guild_id: int, member_id: int, limit: float | None) -> None:
    """A per-member daily limit in units (None removes the override; 0 is unlimited)."""
    await tx.run(
        """INSERT INTO member_quotas (guild_id, member_id, daily_limit) VALUES (?, ?, ?)
           ON CONFLICT (guild_id, member_id) DO UPDATE SET daily_limit = excluded.daily_limit""",
        (guild_id, member_id, limit),
    )


async def reset_member_usage(tx: Tx, guild_id: int, member_id: int) -> None:
    """Forget the member's usage so far; charges after now count again."""
    await tx.run(
        """INSERT INTO member_quotas (guild_id, member_id, reset_at) VALUES (?, ?, ?)
           ON CONFLICT (guild_id, member_id) DO UPDATE SET reset_at = excluded.reset_at""",
        (guild_id, member_id, tx.now),
    )


async def set_guild_limit(tx: Tx, guild_id: int, limit: float) -> None:
    """The server's daily limit in units (0 is unlimited)."""
    await tx.run(
        """INSERT INTO guild_settings (guild_id, name, value) VALUES (?, 'daily_limit', ?)
           ON CONFLICT (guild_id, name) DO UPDATE SET value = excluded.value""",
        (guild_id, str(limit)),
    )
