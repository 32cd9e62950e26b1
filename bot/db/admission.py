"""Admission: the one transaction that lets a request into the queue."""

from __future__ import annotations

from bot.db import jobs, moderation, quotas
from bot.db.connection import Tx
from bot.quota import CostOverCap, MemberBanned, PromptBlocked, QuotaExceeded, TooManyQueued
from bot.requests import GenerationRequest, Job


async def admit(
    tx: Tx,
    request: GenerationRequest,
    *,
    member_id: int,
    guild_id: int | None,
    channel_id: int | None,
    interaction_id: int | None = None,
    default_limit: float = 0,
    exempt: bool = False,
    max_queued: int = 0,
    max_cost: float = 0,
    parent: tuple[int, int] | None = None,
    init_png: bytes | None = None,
    weight: float = 1.0,
) -> Job:
    """Check the ban list, the blocklist, the cost cap per request (`max_cost` units), the
    member's jobs queued or running (at most `max_queued`) and the daily quota, then write the
    job and its charge; a limit of 0 is no limit. Quota-exempt members skip only the daily
    quota. Run it with `Store.write`: in one transaction, concurrent requests can never
    overspend or overfill, and a refused request (AdmissionRefused) leaves nothing behind."""
    guild = guild_id or 0  # direct messages count as server 0
    if (ban := await moderation.ban_of(tx, guild, member_id)) is not None:
        raise MemberBanned(ban.reason)
    # Only the prompt: a blocked term in the negative prompt keeps it out of the image.
    if (term := await moderation.blocked_term_in(tx, guild, request.prompt)) is not None:
        raise PromptBlocked(term)
    if max_cost and request.cost > max_cost:
        raise CostOverCap(request, max_cost)
    if max_queued and (active := await active_jobs(tx, member_id)) >= max_queued:
        raise TooManyQueued(active, max_queued)
    standing = await quotas.status(tx, guild, member_id, default_limit=default_limit, exempt=exempt)
    if not standing.allows(request.cost):
        raise QuotaExceeded(standing, request)
    source = jobs.JobSource(member_id, guild_id, channel_id, interaction_id, parent, weight)
    job = await jobs.insert(tx, request, source, init_png)
    await quotas.charge(tx, guild, member_id, job.id, request.cost)
    return job


async def active_jobs(tx: Tx, member_id: int) -> int:
    """The member's jobs queued or running, on every server: they all wait for the same
    device. Read through the jobs (member_id, status) index."""
    return await tx.value(
        "SELECT COUNT(*) FROM jobs WHERE member_id = ? AND status IN ('queued', 'running')",
        (member_id,),
    )
