"""Posting a finished job: its images (a grid first when there are several), the parameters
that reproduce them, and the Vary/Reroll buttons; or why it failed or was cancelled."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from dataclasses import dataclass
from typing import Any

import discord

from bot import operations
from bot.db import Store, jobs, members
from bot.handoff import JobResult, Undeliverable
from bot.images import grid, parameters_text, png_bytes
from bot.requests import GenerationRequest, Job
from cogs.common import loras_text
from cogs.operations import operations_for, result_view
from cogs.status import StatusBoard

log = logging.getLogger(__name__)

# Interaction tokens live 15 minutes; past this age we post to the channel instead.
FOLLOWUP_WINDOW_SECONDS = 14 * 60
MAX_FILES = 10  # Discord's attachments per message
MAX_ERROR_TEXT = 1800  # an error quoted to a member, well inside a message's 2,000 characters


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
    if request.loras:
        embed.add_field(name="LoRAs", value=loras_text(request.loras)[:1024])
    if request.strength is not None:
        embed.add_field(name="Strength", value=f"{request.strength:g} (from an image)")
    if request.operation is not None:
        embed.add_field(name="Made with", value=operations.label(request.operation))
    if seconds is not None:
        embed.set_footer(text=f"Generated in {seconds:.1f} s")
    return embed


@dataclass(frozen=True)
class Upload:
    """One file of a result: an image (`index` in the request) or the grid (`index` None)."""

    filename: str
    data: bytes
    index: int | None = None

    def file(self) -> discord.File:
        return discord.File(io.BytesIO(self.data), self.filename)


def result_uploads(request: GenerationRequest, result: JobResult) -> list[Upload]:
    """PNGs of the images the safety checker let through, a grid first when there are
    several. Runs in a thread: encoding big grids is slow."""
    kept = [index for index, generated in enumerate(result.images) if not generated.withheld]
    uploads = []
    if len(kept) > 1:
        sheet = grid([result.images[index].image for index in kept])
        uploads.append(Upload("grid.png", png_bytes(sheet)))
    for index in kept:
        seed = request.seeds[index]
        data = png_bytes(result.images[index].image, parameters_text(request, seed))
        uploads.append(Upload(f"seed-{seed}.png", data, index))
    return uploads


def pack(uploads: list[Upload], limit: int) -> list[list[Upload]] | None:
    """The uploads as messages Discord accepts: at most 10 files and `limit` bytes each. All
    in one message, grid included, when that fits; else the images alone, in order, over as
    many messages as needed. None when one image alone is over the limit."""
    if len(uploads) <= MAX_FILES and sum(len(u.data) for u in uploads) <= limit:
        return [uploads]
    images = [upload for upload in uploads if upload.index is not None]
    if any(len(upload.data) > limit for upload in images):
        return None
    parts: list[list[Upload]] = [[]]
    for upload in images:
        part = parts[-1]
        if part and (
            len(part) == MAX_FILES or sum(len(u.data) for u in part) + len(upload.data) > limit
        ):
            parts.append(part := [])
        part.append(upload)
    return parts


def split(part: list[Upload]) -> list[list[Upload]] | None:
    """After Discord refused `part` as too large: the images without the grid, else in
    halves; None for a lone image."""
    images = [upload for upload in part if upload.index is not None]
    if images and len(images) < len(part):
        return [images]
    if len(images) > 1:
        half = len(images) // 2
        return [images[:half], images[half:]]
    return None


def shorten(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def too_large(error: discord.HTTPException) -> bool:
    """Discord's 413 (or its 40005 code): the files were over the upload limit."""
    return error.status == 413 or error.code == 40005


@dataclass
class Place:
    """Where a job's answers go: a follow-up to `interaction` while its token is young, else
    the channel (as a reply to `reply_to` when the request was a reply), else a DM."""

    job: Job
    interaction: discord.Interaction | None
    arrived: float
    private: bool
    reply_to: discord.Message | None

    @property
    def requester(self) -> discord.AllowedMentions:
        """The member the answer is for may be pinged; nobody else."""
        return discord.AllowedMentions(
            everyone=False,
            roles=False,
            users=[discord.Object(self.job.member_id)],
            replied_user=False,
        )


class Delivery:
    """Hears every finished job from the service and posts it where the member will see it:
    a follow-up while the interaction token is young, else the channel, else a DM.

    Whatever happens, the job's status message ends. A result that cannot be posted at all
    (over Discord's limits even split up, or refused) raises `Undeliverable` after telling
    the member, so the executor fails the job with a refund instead of marking it done."""

    def __init__(self, client: discord.Client, store: Store, board: StatusBoard) -> None:
        self.client = client
        self.store = store
        self.board = board

    async def deliver(self, result: JobResult) -> None:
        job = result.job
        if result.cancelled:
            await self.board.finish(
                job.id, f"Job #{job.id} was cancelled; its images were refunded."
            )
        elif result.error is not None:
            await self._tell_failure(await self._place(job), f"failed: {result.error}")
        else:
            await self._deliver_images(await self._place(job), result)

    async def withdraw(self, job_ids: list[int], text: str) -> None:
        """Jobs cancelled outside the executor (a moderator, a ban, /forget-me): end their
        status messages with `text` (which may hold `{job}`) and forget them."""
        for job_id in job_ids:
            await self.board.finish(job_id, text.format(job=job_id))

    async def withdraw_member(self, member_id: int, text: str) -> None:
        """`withdraw` every job of a member shown on the status board."""
        mine = [s.job_id for s in list(self.board.statuses.values()) if s.member_id == member_id]
        await self.withdraw(mine, text)

    async def _place(self, job: Job) -> Place:
        status = self.board.statuses.get(job.id)
        if status is None:  # admitted before a restart: the stored preference still holds
            private = (await self.store.read(members.defaults, job.member_id)).private
            return Place(job, None, 0.0, private, None)
        return Place(job, status.interaction, status.arrived, status.private, status.reply_to)

    async def _tell_failure(self, place: Place, what: str) -> None:
        """Tell the member their job `what` (failed: …) and that it was refunded; the status
        message is replaced by the notice, or says it when the notice cannot be posted."""
        job = place.job
        text = shorten(f"job #{job.id} {what}", MAX_ERROR_TEXT) + ". Its images were refunded."
        try:
            sent = await self._post(
                place, content=f"<@{job.member_id}> {text}", allowed_mentions=place.requester
            )
        except Exception:
            log.exception("telling member %s about job %s failed", job.member_id, job.id)
            sent = None
        await self.board.finish(job.id, None if sent is not None else text[0].upper() + text[1:])

    async def _deliver_images(self, place: Place, result: JobResult) -> None:
        job = place.job
        try:
            await self._post_result(place, result)
        except Exception as error:
            if not isinstance(error, Undeliverable):
                log.exception("delivering job %s failed", job.id)
                error = Undeliverable("Discord refused the message")
            await self._tell_failure(place, f"could not be delivered: {error}")
            raise error
        await self.board.finish(job.id, None)  # the result replaces the status and preview

    async def _post_result(self, place: Place, result: JobResult) -> None:
        """The images over as few messages as Discord's limits allow: the first carries the
        parameters, Reroll and the record of where the result is; each carries the Vary
        buttons of its own images. A refusal for size splits further (grid first)."""
        job, request = place.job, place.job.request
        uploads = await asyncio.to_thread(result_uploads, request, result)
        parts = pack(uploads, self._upload_limit(place))
        if parts is None:
            raise Undeliverable("an image is larger than Discord accepts")
        kept = [u.index for u in uploads if u.index is not None]
        withheld = request.count - len(kept)
        lines = [f"<@{job.member_id}> job #{job.id}"]
        if withheld:
            lines.append(f"{withheld} of {request.count} image(s) withheld by the safety checker.")
            if withheld == request.count:
                lines.append("They were refunded.")
        first = {
            "content": "\n".join(lines),
            "embed": describe(request, result.seconds),
            "allowed_mentions": place.requester,
        }
        offered = operations_for(request, self.client.settings)
        number = 0
        while parts:
            part = parts.pop(0)
            indexes = [u.index for u in part if u.index is not None]
            message = first if number == 0 else {"content": f"Job #{job.id}, continued."}
            view = result_view(job.id, indexes, reroll=number == 0, offered=offered)
            try:
                sent = await self._post(
                    place,
                    withheld=withheld if number == 0 else None,
                    part=number,
                    files=[upload.file() for upload in part],
                    view=view,
                    **message,
                )
            except discord.HTTPException as error:
                if not too_large(error):
                    raise
                smaller = split(part)
                if smaller is None:
                    raise Undeliverable("an image is larger than Discord accepts") from error
                log.info("job %s: Discord refused %d file(s) as too large", job.id, len(part))
                parts[:0] = smaller
                continue
            if sent is None:
                raise Undeliverable("neither the channel nor a DM would take it")
            number += 1

    def _upload_limit(self, place: Place) -> int:
        """The most bytes one message may upload wherever it may end up (the follow-up, the
        channel, a DM)."""
        limits = [discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES]
        if place.interaction is not None:
            limits.append(place.interaction.filesize_limit)
        guild = self.client.get_guild(place.job.guild_id) if place.job.guild_id else None
        if guild is not None:
            limits.append(guild.filesize_limit)
        return min(limits)

    async def _post(
        self, place: Place, withheld: int | None = None, part: int = 0, **message: Any
    ) -> discord.Message | None:
        """Follow up while the interaction token is young; else post in the channel with a nonce
        (so a retry after a crash cannot post twice); if the channel refuses us, or the member
        wants results privately, send a DM. A result (`withheld` given) is recorded in the
        store with the message that carries it."""
        job, interaction = place.job, place.interaction
        sent = None
        if job.attempts > 1 and not place.private and withheld is not None:
            sent = await self._earlier_post(job)
        if (
            sent is None
            and interaction is not None
            and time.monotonic() - place.arrived < FOLLOWUP_WINDOW_SECONDS
        ):
            try:
                sent = await interaction.followup.send(
                    wait=True, ephemeral=place.private, **message
                )
            except discord.NotFound:  # the token expired early or the interaction is gone
                log.info("follow-up for job %s failed; posting in the channel", job.id)
        if sent is None:
            if place.reply_to is not None and part == 0:
                message["reference"] = place.reply_to
                message["mention_author"] = True
            sent = await self._post_outside_interaction(job, message, place.private, part)
        if sent is not None and withheld is not None:
            try:
                await self.store.write(
                    jobs.record_delivery, job.id, sent.channel.id, sent.id, withheld
                )
            except Exception:  # posted all the same: only a crash-time rerun relies on it
                log.exception("recording where job %s was posted failed", job.id)
        return sent

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
        self, job: Job, message: dict[str, Any], private: bool, part: int = 0
    ) -> discord.Message | None:
        """Post in the job's channel (once: the nonce), else by DM when the channel is
        closed to us or the results are private; None when neither works."""
        nonce = f"imagine-job-{job.id}" + (f"-{part}" if part else "")
        if not private:
            for file in message.get("files", []):
                file.reset()
            try:
                channel = await self._channel(job.channel_id)
                return await channel.send(nonce=nonce, **message)
            except (discord.Forbidden, discord.NotFound):
                log.warning("cannot post job %s in channel %s; trying a DM", job.id, job.channel_id)
        for file in message.get("files", []):
            file.reset()
        message.pop("reference", None)
        try:
            member = await self.client.fetch_user(job.member_id)
            return await member.send(**message)
        except discord.HTTPException as error:
            if too_large(error):
                raise
            log.warning("cannot deliver job %s to member %s at all", job.id, job.member_id)
            return None
