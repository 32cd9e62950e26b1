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
    model: str | None = None


async def defaults(tx: Tx, member_id: int) -> MemberDefaults:
    row = await tx.one(
        """SELECT steps, width, height, scheduler, negative_prompt, count, private, model
           FROM member_defaults WHERE member_id = ?""",
        (member_id,),
    )
    if row is None:
        return MemberDefaults()
    return MemberDefaults(**{**dict(row), "private": bool(row["private"])})


async def set_defaults(tx: Tx, member_id: int, chosen: MemberDefaults) -> None:
    await tx.run(
        """INSERT OR REPLACE INTO member_defaults
               (member_id, steps, width, height, scheduler, negative_prompt, count, private,
                model)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            member_id,
            chosen.steps,
            chosen.width,
            chosen.height,
            chosen.scheduler,
            chosen.negative_prompt,
            chosen.count,
            int(chosen.private),
            chosen.model,
        ),
    )


async def history(tx: Tx, member_id: int, limit: int = 10) -> list[jobs.JobRecord]:
    return await jobs.of_member(tx, member_id, limit)


# The jobs other members derived (Vary, Reroll, replies) from a member's jobs, at any depth.
DERIVED = """
    WITH RECURSIVE derived(id) AS (
        SELECT id FROM jobs WHERE parent_job_id IN (SELECT id FROM jobs WHERE member_id = ?1)
        UNION
        SELECT jobs.id FROM jobs JOIN derived ON jobs.parent_job_id = derived.id
    )
    SELECT jobs.id, jobs.status, jobs.prompt, jobs.negative_prompt, jobs.init_image_hash
    FROM jobs JOIN derived USING (id) WHERE jobs.member_id != ?1
"""


async def forget(tx: Tx, member_id: int) -> int:
    """Delete a member's jobs (prompts and parameters) and their uploads everywhere and return
    how many jobs; the ledger keeps bare amounts (cost units) so quotas still hold. Raises
    JobStillRunning, changing nothing, while a job of theirs, or one derived from theirs,
    runs: its row is still in use. Follow with `Store.checkpoint()` so the text leaves the
    write-ahead log too.

    Jobs others derived from theirs stay (they are the others' jobs), but not the member's
    text in them: a prompt or negative prompt copied from theirs is blanked, and the derived
    job loses the upload it shared; one still queued is cancelled and refunded, since it
    cannot run without them. A prompt the other member wrote themselves is kept."""
    own = await tx.all(
        "SELECT status, prompt, negative_prompt, init_image_hash FROM jobs WHERE member_id = ?",
        (member_id,),
    )
    derived = await tx.all(DERIVED, (member_id,))
    if any(row["status"] == "running" for row in [*own, *derived]):
        raise JobStillRunning(member_id)
    texts = {row[k] for row in own for k in ("prompt", "negative_prompt") if row[k]}
    uploads = {row["init_image_hash"] for row in own if row["init_image_hash"]}
    for row in derived:
        copied = row["prompt"] in texts or row["negative_prompt"] in texts
        if not (copied or row["init_image_hash"] in uploads):
            continue
        if row["status"] == "queued":
            await jobs.request_cancel(tx, row["id"])
        await tx.run(
            "UPDATE jobs SET prompt = ?, negative_prompt = ?, init_image_hash = ? WHERE id = ?",
            (
                "" if row["prompt"] in texts else row["prompt"],
                "" if row["negative_prompt"] in texts else row["negative_prompt"],
                None if row["init_image_hash"] in uploads else row["init_image_hash"],
                row["id"],
            ),
        )
    for row in await tx.all(
        "SELECT id FROM jobs WHERE member_id = ? AND status = 'queued'", (member_id,)
    ):
        await quotas.refund(tx, row["id"])
    cursor = await tx.run("DELETE FROM jobs WHERE member_id = ?", (member_id,))
    await tx.run("DELETE FROM member_defaults WHERE member_id = ?", (member_id,))
    # Their uploads go with them: derived jobs let go of theirs above, so only another
    # member's own job, from an upload of the very same bytes, can still hold one.
    await tx.run(
        """DELETE FROM init_images WHERE hash NOT IN
           (SELECT init_image_hash FROM jobs WHERE init_image_hash IS NOT NULL)"""
    )
    return cursor.rowcount
