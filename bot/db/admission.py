"""Admission: the one transaction that lets a request into the queue."""

from __future__ import annotations

from bot.db import jobs, moderation, quotas
from bot.db.connection import Tx
from bot.intake import AdmissionCaps, Intake
from bot.quota import CostOverCap, MemberBanned, PromptBlocked, QuotaExceeded, TooManyQueued
from bot.requests import GenerationRequest, Job

NO_CAPS = AdmissionCaps()


async def admit(
    tx: Tx,
    request: GenerationRequest,
    intake: Intake,
    caps: AdmissionCaps = NO_CAPS,
    init_png: bytes | None = None,
) -> Job:
    """Check the ban list, the blocklist, the cost cap per request, the member's jobs queued or
    running and the daily quota (`caps`), then write the job and its charge. Quota-exempt
    members skip only the daily quota. Run it with `Store.write`: in one transaction,
    concurrent requests can never overspend or overfill, and a refused request
    (AdmissionRefused) leaves nothing behind."""
    guild, member_id = intake.guild_id or 0, intake.member_id  # a DM counts as server 0
    if (ban := await moderation.ban_of(tx, guild, member_id)) is not None:
        raise MemberBanned(ban.reason)
    # Only the prompt: a blocked term in the negative prompt keeps it out of the image.
    if (term := await moderation.blocked_term_in(tx, guild, request.prompt)) is not None:
        raise PromptBlocked(term)
    if caps.max_cost and request.cost > caps.max_cost:
        raise CostOverCap(request, caps.max_cost)
    if caps.max_queued and (active := await active_jobs(tx, member_id)) >= caps.max_queued:
        raise TooManyQueued(active, caps.max_queued)
    standing = await quotas.status(
        tx, guild, member_id, default_limit=caps.daily_quota, exempt=intake.exempt
    )
    if not standing.allows(request.cost):
        raise QuotaExceeded(standing, request)
    job = await jobs.insert(tx, request, intake, init_png)
    await quotas.charge(tx, guild, member_id, job.id, request.cost)
    return job


async def active_jobs(tx: Tx, member_id: int) -> int:
    """The member's jobs queued or running, on every server: they all wait for the same
    device. Read through the jobs (member_id, status) index."""
    return await tx.value(
        "SELECT COUNT(*) FROM jobs WHERE member_id = ? AND status IN ('queued', 'running')",
        (member_id,),
    )
