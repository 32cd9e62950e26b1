"""Admission: the one transaction that lets a request into the queue."""

from __future__ import annotations

from bot.db import jobs, moderation, quotas
from bot.db.connection import Tx
from bot.quota import MemberBanned, PromptBlocked, QuotaExceeded
from bot.requests import GenerationRequest, Job


async def admit(
    tx: Tx,
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
    """Check the ban list, the blocklist and the quota, then write the job and its charge.
    Run it with `Store.write`: in one transaction, concurrent requests can never overspend,
    and a refused request (AdmissionRefused) leaves nothing behind."""
    guild = guild_id or 0  # direct messages count as server 0
    if (ban := await moderation.ban_of(tx, guild, member_id)) is not None:
        raise MemberBanned(ban.reason)
    # Only the prompt: a blocked term in the negative prompt keeps it out of the image.
    if (term := await moderation.blocked_term_in(tx, guild, request.prompt)) is not None:
        raise PromptBlocked(term)
    standing = await quotas.status(tx, guild, member_id, default_limit=default_limit, exempt=exempt)
    if not standing.allows(request.count):
        raise QuotaExceeded(standing, request.count)
    source = jobs.JobSource(member_id, guild_id, channel_id, interaction_id, parent)
    job = await jobs.insert(tx, request, source, init_png)
    await quotas.charge(tx, guild, member_id, job.id, request.count)
    return job
