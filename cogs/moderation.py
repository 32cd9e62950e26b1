"""/mod: quotas, bans, the queue, usage stats, the prompt blocklist and the audit log.

Discord hides these from members without Manage Server by default, but server admins can change
that, so every call is checked again here. Answers are private to the moderator, and show the
moderator's own server only: one bot serves many servers, and a moderator of one is trusted
with nothing of another's members. What the device as a whole is doing (busy share, loaded
models, counts since start) is shown as such.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.blocklist import normalize_term
from bot.db import jobs, moderation, quotas
from bot.intake import quota_exempt
from bot.metrics import Figures
from bot.quota import units_phrase
from bot.requests import Job
from cogs.common import frees_up_text, relative_time, role_ids

if TYPE_CHECKING:
    from bot.app import ImagineBot

MAX_LIMIT = 100_000
LIMIT_HELP = "Cost units per 24 hours: a 512×512 image at 25 steps is 1 unit (0 = unlimited)"
# The status message of a job a moderator cancelled ({job} is its number).
CANCELLED_BY_MODERATOR = "Job #{job} was cancelled by a moderator; its images were refunded."


def limit_text(limit: float) -> str:
    return "no limit" if limit == 0 else f"{units_phrase(limit)} a day"


def mention(member_id: int | None) -> str:
    return f"<@{member_id}>" if member_id else "nobody"


def job_line(position: int | None, job: Job) -> str:
    request = job.request
    where = "running" if position is None else f"{position}."
    return (
        f"{where} #{job.id} {mention(job.member_id)} · {request.count}× {request.width}×"
        f"{request.height} · {request.steps} steps · {request.scheduler} · "
        f"queued {relative_time(job.queued_at)}"
    )


# Queued jobs per page of /mod queue list, and the members whose share it shows.
QUEUE_PAGE = 15
SHARES_SHOWN = 10


def seconds_text(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.1f} s"


def live_text(figures: Figures) -> str:
    """Since the bot started, all servers: the same counters the metrics endpoint serves."""
    fill = "n/a" if figures.mean_fill is None else f"{figures.mean_fill:.0%}"
    busy = ", ".join(f"{w} {share:.0%}" for w, share in sorted(figures.busy_share.items()))
    models = "; ".join(f"{w}: {', '.join(m)}" for w, m in sorted(figures.resident.items()))
    refused = ", ".join(f"{r} {n}" for r, n in sorted(figures.refusals.items())) or "none"
    return (
        f"Since the bot started: {figures.images} images in {figures.calls} calls, batches "
        f"{fill} full on average; mean wait {seconds_text(figures.mean_wait)}, mean call "
        f"{seconds_text(figures.mean_generation)}.\n"
        f"Workers busy: {busy or 'none yet'}. Loaded: {models or 'nothing yet'}.\n"
        f"Refused: {refused}."
    )


class ModerationCog(commands.Cog):
    mod = app_commands.Group(
        name="mod",
        description="Moderator tools",
        guild_only=True,
        default_permissions=discord.Permissions(manage_guild=True),
    )
    quota = app_commands.Group(name="quota", description="Daily quotas in cost units", parent=mod)
    queue = app_commands.Group(name="queue", description="The job queue", parent=mod)
    blocklist = app_commands.Group(name="blocklist", description="Blocked prompt terms", parent=mod)

    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.service = bot.service
        self.store = bot.store

    async def interaction_check(self, interaction: discord.Interaction[ImagineBot]) -> bool:
        """Our own check on every /mod call, whatever Discord's permission settings say."""
        if interaction.guild_id is None or not interaction.permissions.manage_guild:
            raise app_commands.MissingPermissions(["manage_guild"])
        return True

    async def _done(
        self,
        interaction: discord.Interaction[ImagineBot],
        text: str,
        *,
        action: str | None = None,
        target: discord.abc.User | None = None,
    ) -> None:
        """Answer privately and, for actions that change something, write the audit entry."""
        if action is not None:
            await self.store.write(
                moderation.record_audit,
                interaction.guild_id,
                interaction.user.id,
                action,
                target.id if target else None,
                text,
            )
        await interaction.response.send_message(text[:2000], ephemeral=True)

    # --- quotas ---------------------------------------------------------------------------

    @quota.command(name="show", description="A member's quota and usage")
    async def quota_show(
        self, interaction: discord.Interaction[ImagineBot], member: discord.Member
    ) -> None:
        status = await self.service.quota(
            interaction.guild_id,
            member.id,
            exempt=quota_exempt(self.bot.settings, role_ids(member)),
        )
        active = await self.store.read(moderation.active_jobs_in, interaction.guild_id, member.id)
        limit = "exempt (a quota-exempt role)" if status.exempt else limit_text(status.limit)
        text = (
            f"{member.mention}: {units_phrase(status.used)} in the last 24 hours; limit: "
            f"{limit}; {active} job(s) queued or running here.{frees_up_text(status)}"
        )
        await self._done(interaction, text)

    @quota.command(name="set", description="A member's daily limit in cost units (0 = unlimited)")
    @app_commands.describe(limit=LIMIT_HELP)
    async def quota_set(
        self,
        interaction: discord.Interaction[ImagineBot],
        member: discord.Member,
        limit: app_commands.Range[float, 0, MAX_LIMIT],
    ) -> None:
        if not 0 <= limit <= MAX_LIMIT:
            await self._done(interaction, f"`limit` must be from 0 to {MAX_LIMIT}.")
            return
        limit = round(limit, 3)  # the ledger counts thousandths of a unit
        await self.store.write(quotas.set_member_limit, interaction.guild_id, member.id, limit)
        await self._done(
            interaction,
            f"{member.mention} now has {limit_text(limit)}.",
            action="quota set",
            target=member,
        )

    @quota.command(name="reset", description="Forget a member's usage so far")
    async def quota_reset(
        self, interaction: discord.Interaction[ImagineBot], member: discord.Member
    ) -> None:
        await self.store.write(quotas.reset_member_usage, interaction.guild_id, member.id)
        await self._done(
            interaction,
            f"{member.mention}'s usage is reset.",
            action="quota reset",
            target=member,
        )

    @quota.command(name="default", description="The server's daily limit in cost units (0 = none)")
    @app_commands.describe(limit=LIMIT_HELP)
    async def quota_default(
        self,
        interaction: discord.Interaction[ImagineBot],
        limit: app_commands.Range[float, 0, MAX_LIMIT],
    ) -> None:
        if not 0 <= limit <= MAX_LIMIT:
            await self._done(interaction, f"`limit` must be from 0 to {MAX_LIMIT}.")
            return
        limit = round(limit, 3)
        await self.store.write(quotas.set_guild_limit, interaction.guild_id, limit)
        await self._done(
            interaction, f"Members now have {limit_text(limit)}.", action="quota default"
        )

    # --- bans -----------------------------------------------------------------------------

    @mod.command(name="ban", description="Stop a member from generating; cancels their queue")
    async def ban(
        self,
        interaction: discord.Interaction[ImagineBot],
        member: discord.Member,
        reason: str | None = None,
    ) -> None:
        reason = (reason or "").strip()[:300] or None
        cancelled = await self.bot.service.ban(
            interaction.guild_id, member.id, interaction.user.id, reason
        )
        text = f"{member.mention} is banned from generating"
        text += f" ({reason})." if reason else "."
        if cancelled:
            text += f" Cancelled and refunded {len(cancelled)} queued job(s)."
        await self._done(interaction, text, action="ban", target=member)
        await self.bot.delivery.withdraw([job.id for job in cancelled], CANCELLED_BY_MODERATOR)

    @mod.command(name="unban", description="Let a banned member generate again")
    async def unban(
        self, interaction: discord.Interaction[ImagineBot], member: discord.Member
    ) -> None:
        if await self.store.write(moderation.unban, interaction.guild_id, member.id):
            await self._done(
                interaction, f"{member.mention} may generate again.", action="unban", target=member
            )
        else:
            await self._done(interaction, f"{member.mention} was not banned.")

    # --- queue ----------------------------------------------------------------------------

    @queue.command(name="list", description="Running and queued jobs, a page at a time")
    @app_commands.describe(page="Page of the queue, 1 first")
    async def queue_list(
        self,
        interaction: discord.Interaction[ImagineBot],
        page: app_commands.Range[int, 1, 10_000] = 1,
    ) -> None:
        """This server's running jobs, then a page of its queue in fair order, with its
        members' shares of the device."""
        queue = self.bot.service.queue
        running = await self.store.read(jobs.running, interaction.guild_id) if page == 1 else []
        offset = (page - 1) * QUEUE_PAGE
        waiting = queue.page(offset, QUEUE_PAGE, guild_id=interaction.guild_id)
        if not running and not waiting:
            empty = "The queue is empty." if page == 1 else f"Page {page} of the queue is empty."
            await self._done(interaction, empty)
            return
        lines = [job_line(None, job) for job in running]
        lines += [job_line(offset + i, job) for i, job in enumerate(waiting, start=1)]
        lines.append(f"Page {page}; {len(queue)} job(s) queued across every server.")
        shares = queue.shares(interaction.guild_id)[:SHARES_SHOWN]
        if shares:
            lines.append("Fair share of the GPU while they wait:")
            lines += [
                f"{mention(s.member_id)} {s.share:.0%} (weight {s.weight:g}) · {s.jobs} job(s),"
                f" {s.units:g} units queued"
                for s in shares
            ]
        await self._done(interaction, "\n".join(lines))

    @queue.command(name="clear", description="Cancel and refund queued jobs (one member's or all)")
    async def queue_clear(
        self, interaction: discord.Interaction[ImagineBot], member: discord.Member | None = None
    ) -> None:
        cancelled = await self.bot.service.clear_queue(
            interaction.guild_id, member.id if member else None
        )
        whose = f"{member.mention}'s" if member else "all"
        await self._done(
            interaction,
            f"Cancelled and refunded {len(cancelled)} of {whose} queued job(s).",
            action="queue clear",
            target=member,
        )
        await self.bot.delivery.withdraw([job.id for job in cancelled], CANCELLED_BY_MODERATOR)

    # --- stats and audit ------------------------------------------------------------------

    @mod.command(name="stats", description="Usage over the last day and week")
    async def stats(self, interaction: discord.Interaction[ImagineBot]) -> None:
        stats = await self.store.read(moderation.usage_stats, interaction.guild_id)
        top = ", ".join(f"{mention(m)} ({n})" for m, n in stats.top_members) or "nobody yet"
        text = (
            f"Images: {stats.images_day} in the last 24 hours, {stats.images_week} in 7 days.\n"
            f"Top members this week: {top}\n"
            f"Mean wait {seconds_text(stats.mean_wait)}, "
            f"mean generation {seconds_text(stats.mean_generation)}.\n"
            f"The GPU was busy {stats.busy_share:.0%} of the last 24 hours.\n"
            f"{live_text(self.service.metrics.figures())}"
        )
        await self._done(interaction, text)

    @mod.command(name="audit", description="Recent moderator actions")
    async def audit(self, interaction: discord.Interaction[ImagineBot]) -> None:
        entries = await self.store.read(moderation.audit_log, interaction.guild_id)
        if not entries:
            await self._done(interaction, "No moderator actions yet.")
            return
        lines = [
            f"{relative_time(e.at)} {mention(e.moderator_id)} **{e.action}**: {e.detail}"
            for e in entries
        ]
        await self._done(interaction, "\n".join(lines))

    # --- blocklist ------------------------------------------------------------------------

    @blocklist.command(name="add", description="Refuse prompts containing a term")
    async def blocklist_add(
        self, interaction: discord.Interaction[ImagineBot], term: app_commands.Range[str, 1, 100]
    ) -> None:
        term = term.strip()
        if not normalize_term(term):
            await self._done(interaction, "`term` must contain letters or digits.")
            return
        if await self.store.write(
            moderation.add_blocked_term, interaction.guild_id, term, interaction.user.id
        ):
            await self._done(interaction, f"Blocked `{term}`.", action="blocklist add")
        else:
            await self._done(interaction, f"`{term}` was already blocked.")

    @blocklist.command(name="remove", description="Allow a blocked term again")
    async def blocklist_remove(
        self, interaction: discord.Interaction[ImagineBot], term: str
    ) -> None:
        if await self.store.write(moderation.remove_blocked_term, interaction.guild_id, term):
            await self._done(interaction, f"Unblocked `{term}`.", action="blocklist remove")
        else:
            await self._done(interaction, f"`{term}` is not on the blocklist.")

    @blocklist.command(name="list", description="The blocked terms")
    async def blocklist_list(self, interaction: discord.Interaction[ImagineBot]) -> None:
        terms = await self.store.read(moderation.blocked_terms, interaction.guild_id)
        text = ", ".join(f"`{t}`" for t in terms) if terms else "No terms are blocked."
        await self._done(interaction, text)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(ModerationCog(bot))
