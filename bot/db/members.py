"""A member's own data: their /settings defaults, their history, and forgetting them."""

from __future__ import annotations

from dataclasses import dataclass

from bot.db import jobs, quotas
from bot.db.connection import Tx


class JobStillRunning(Exception):
    """A member's data cannot be deleted while one of their jobs is in a running batch."""


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


async def defaults(tx: Tx, member_id: int) -> MemberDefaults:
    row = await tx.one(
        """SELECT steps, width, height, scheduler, negative_prompt, count, private
           FROM member_defaults WHERE member_id = ?""",
        (member_id,),
    )
    if row is None:
        return MemberDefaults()
    return MemberDefaults(**{**dict(row), "private": bool(row["private"])})


async def set_defaults(tx: Tx, member_id: int, chosen: MemberDefaults) -> None:
    await tx.run(
        """INSERT OR REPLACE INTO member_defaults
               (member_id, steps, width, height, scheduler, negative_prompt, count, private)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            member_id,
            chosen.steps,
            chosen.width,
            chosen.height,
            chosen.scheduler,
            chosen.negative_prompt,
            chosen.count,
            int(chosen.private),
        ),
    )


async def history(tx: Tx, member_id: int, limit: int = 10) -> list[jobs.JobRecord]:
    return await jobs.of_member(tx, member_id, limit)


async def forget(tx: Tx, member_id: int) -> int:
    """Delete a member's jobs (prompts and parameters) everywhere and return how many; the
    ledger keeps bare image counts so quotas still hold. Raises JobStillRunning, changing
    nothing, while a job of theirs runs: its row is still in use. Follow with
    `Store.checkpoint()` so the text leaves the write-ahead log too."""
    running = await tx.one(
        "SELECT 1 FROM jobs WHERE member_id = ? AND status = 'running'", (member_id,)
    )
    if running is not None:
        raise JobStillRunning(member_id)
    for row in await tx.all(
        "SELECT id FROM jobs WHERE member_id = ? AND status = 'queued'", (member_id,)
    ):
        await quotas.refund(tx, row["id"])
    cursor = await tx.run("DELETE FROM jobs WHERE member_id = ?", (member_id,))
    await tx.run("DELETE FROM member_defaults WHERE member_id = ?", (member_id,))
    await tx.run(
        """DELETE FROM init_images WHERE hash NOT IN
           (SELECT init_image_hash FROM jobs WHERE init_image_hash IS NOT NULL)"""
    )
    return cursor.rowcount
