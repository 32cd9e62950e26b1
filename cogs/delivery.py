"""Posting a finished job: its images (a grid first when there are several), the parameters
that reproduce them, and the Vary/Reroll buttons; or why it failed or was cancelled."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from typing import Any

import discord

from bot.db import Store, jobs, members
from bot.executor import JobResult
from bot.images import grid, parameters_text, png_bytes
from bot.requests import GenerationRequest, Job
from cogs.admission import StatusBoard
from cogs.buttons import result_view

log = logging.getLogger(__name__)

# Interaction tokens live 15 minutes; past this age we post to the channel instead.
FOLLOWUP_WINDOW_SECONDS = 14 * 60


def describe(request: GenerationRequest, seconds: float | None = None) -> discord.Embed:
    """Everything needed to reproduce the images, shown under them."""
    embed = discord.Embed(description=request.prompt[:4000], colour=discord.Colour.blurple())
    if request.negative_prompt:
        embed.add_field(name="Negative prompt", value=request.negative_prompt[:1024], inline=False)
    seeds = request.seeds
    embed.add_field(name="Seed" if len(seeds) == 1 else "Seeds", value=", ".join(map(str, seeds)))
    embed.add_field(name="Steps", value=str(request.steps))
    embed.add_field(name="Guidance", value=f"{request.guidance:g}")
    embed.add_field(name="Size", value=f"{request.width}×{request.height}")
    embed.add_field(name="Scheduler", value=request.scheduler)
    embed.add_field(name="Model", value=request.model[:1024])
    if request.strength is not None:
        embed.add_field(name="Strength", value=f"{request.strength:g} (from an image)")
    if seconds is not None:
        embed.set_footer(text=f"Generated in {seconds:.1f} s")
    return embed


def result_files(
    request: GenerationRequest, result: JobResult
) -> tuple[list[discord.File], list[int]]:
    """PNG files for the delivered images (a grid first when there are several), and the
    indexes of the images the safety checker let through. Runs in a thread: encoding big
    grids is slow."""
    kept = [index for index, generated in enumerate(result.images) if not generated.withheld]
    files = []
    if len(kept) > 1:
        sheet = grid([result.images[index].image for index in kept])
        files.append(discord.File(io.BytesIO(png_bytes(sheet)), "grid.png"))
    for index in kept:
        seed = request.seeds[index]
        data = png_bytes(result.images[index].image, parameters_text(request, seed))
        files.append(discord.File(io.BytesIO(data), f"seed-{seed}.png"))
    return files, kept


class Delivery:
    """Hears every finished job from the service and posts it where the member will see it:
    a follow-up while the interaction token is young, else the channel, else a DM."""

    def __init__(self, client: discord.Client, store: Store, board: StatusBoard) -> None:
        self.client = client
        self.store = store
        self.board = board

    async def deliver(self, result: JobResult) -> None:
        job = result.job
        request = job.request
        status = self.board.statuses.get(job.id)
        interaction, arrived = (status.interaction, status.arrived) if status else (None, 0.0)
        reply_to = status.origin if status else None
        if status is not None:
            private = status.private
        else:  # admitted before a restart: the stored preference still holds
            private = (await self.store.read(members.defaults, job.member_id)).private
        if result.cancelled:
            await self.board.finish(
                job.id, f"Job #{job.id} was cancelled; its images were refunded."
            )
            await self.board.refresh_queue()
            return
        if result.error is not None:
            content = (
                f"<@{job.member_id}> job #{job.id} failed: {result.error}. "
                "Its images were refunded."
            )
            await self._post(job, interaction, arrived, private, reply_to, content=content)
            await self.board.finish(job.id, None)
            await self.board.refresh_queue()
            return
        files, kept = await asyncio.to_thread(result_files, request, result)
        withheld = request.count - len(kept)
        lines = [f"<@{job.member_id}> job #{job.id}"]
        if withheld:
            lines.append(f"{withheld} of {request.count} image(s) withheld by the safety checker.")
            if withheld == request.count:
                lines.append("They were refunded.")
        await self._post(
            job,
            interaction,
            arrived,
            private,
            reply_to,
            withheld=withheld,
            content="\n".join(lines),
            embed=describe(request, result.seconds),
            files=files,
            view=result_view(job.id, kept),
        )
        await self.board.finish(job.id, None)  # the result replaces the status and preview
        await self.board.refresh_queue()

    async def _post(
        self,
        job: Job,
        interaction: discord.Interaction | None,
        arrived: float,
        private: bool,
        reply_to: discord.Message | None,
        withheld: int | None = None,
        **message: Any,
    ) -> None:
        """Follow up while the interaction token is young; else post in the channel with a nonce
        (so a retry after a crash cannot post twice); if the channel refuses us, or the member
        wants results privately, send a DM. A result (`withheld` given) is recorded in the
        store with the message that carries it."""
        sent = None
        if job.attempts > 1 and not private and withheld is not None:
            sent = await self._earlier_post(job)
        if (
            sent is None
            and interaction is not None
            and time.monotonic() - arrived < FOLLOWUP_WINDOW_SECONDS
        ):
            try:
                sent = await interaction.followup.send(wait=True, ephemeral=private, **message)
            except discord.NotFound:  # the token expired early or the interaction is gone
                log.info("follow-up for job %s failed; posting in the channel", job.id)
        if sent is None:
            if reply_to is not None:
                message["reference"] = reply_to
                message["mention_author"] = True
            sent = await self._post_outside_interaction(job, message, private)
        if sent is not None and withheld is not None:
            await self.store.write(jobs.record_delivery, job.id, sent.channel.id, sent.id, withheld)

    async def _channel(self, channel_id: int) -> Any:
        return self.client.get_channel(channel_id) or await self.client.fetch_channel(channel_id)

    async def _earlier_post(self, job: Job) -> discord.Message | None:
        """A result posted before the process died, between posting and recording it: found
        in the channel's recent history, so a rerun after a crash does not post twice."""
        headline = f"<@{job.member_id}> job #{job.id}"
        try:
            channel = await self._channel(job.channel_id)
            async for message in channel.history(limit=50):
                if (
                    message.author == self.client.user
                    and message.content.split("\n")[0] == headline
                ):
                    return message
        except discord.HTTPException:
            pass
        return None

    async def _post_outside_interaction(
        self, job: Job, message: dict[str, Any], private: bool
    ) -> discord.Message | None:
        if not private:
            for file in message.get("files", []):
                file.reset()
            try:
                channel = await self._channel(job.channel_id)
                return await channel.send(nonce=f"imagine-job-{job.id}", **message)
            except (discord.Forbidden, discord.NotFound):
                log.warning("cannot post job %s in channel %s; trying a DM", job.id, job.channel_id)
        for file in message.get("files", []):
            file.reset()
        message.pop("reference", None)
        try:
            member = await self.client.fetch_user(job.member_id)
            return await member.send(**message)
        except discord.HTTPException:
            log.warning("cannot deliver job %s to member %s at all", job.id, job.member_id)
            return None
