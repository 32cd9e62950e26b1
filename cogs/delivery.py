"""Posting a finished job (its files and text: cogs/result_files.py) where its member will see
it, with the Vary/Reroll buttons; or why it failed or was cancelled.

Adult content stays in age-restricted channels. Images the safety checker flags are withheld
and refunded, except where the owner allows them (NSFW_CHANNELS=allow) and the result goes to
an age-restricted channel: there they are posted as spoilers. A model marked `nsfw` posts only
there too. Whether the channel is age-restricted is read from Discord at delivery (the channel
as it is now, also for a job delivered after a restart; no job row keeps a copy to go stale);
a DM never is, so such a result is never sent by DM."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import discord

from bot.db import Store, jobs, members
from bot.handoff import JobResult, Undeliverable
from bot.requests import Job
from cogs.models import age_restricted
from cogs.operations import operations_for, result_view
from cogs.result_files import describe, headline, pack, result_uploads, split, too_large
from cogs.status import StatusBoard

log = logging.getLogger(__name__)

# Interaction tokens live 15 minutes; past this age we post to the channel instead.
FOLLOWUP_WINDOW_SECONDS = 14 * 60
MAX_ERROR_TEXT = 1800  # an error quoted to a member, well inside a message's 2,000 characters


def shorten(text: str, limit: int = MAX_ERROR_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class Place:
    """Where a job's answers go: a follow-up to `interaction` while its token is young, else
    the channel (as a reply to `reply_to` when the request was a reply), else a DM."""

    job: Job
    interaction: discord.Interaction | None
    arrived: float
    private: bool
    reply_to: discord.Message | None
    channel_only: bool = False  # adult content: never sent by DM

    @property
    def followup_open(self) -> bool:
        """Whether the interaction's token is young enough for a follow-up."""
        young = time.monotonic() - self.arrived < FOLLOWUP_WINDOW_SECONDS
        return self.interaction is not None and young

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
        spoilers = await self._spoilers(place, result)
        uploads = await asyncio.to_thread(result_uploads, request, result, spoilers)
        parts = pack(uploads, self._upload_limit(place))
        if parts is None:
            raise Undeliverable("an image is larger than Discord accepts")
        kept = [u.index for u in uploads if u.index is not None]
        withheld = request.count - len(kept)
        first = {
            "content": headline(job, withheld, len(spoilers)),
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
            buttons = {} if view is None else {"view": view}  # a follow-up refuses view=None
            try:
                sent = await self._post(
                    place,
                    withheld=withheld if number == 0 else None,
                    part=number,
                    files=[upload.file() for upload in part],
                    **buttons,
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

    async def _spoilers(self, place: Place, result: JobResult) -> frozenset[int]:
        """The flagged images to post as spoilers. They, and the images of a model marked
        `nsfw`, go only to an age-restricted channel: elsewhere flagged images are withheld,
        and an `nsfw` model's result is Undeliverable (failed and refunded). Spoilers are no
        longer withheld, so the job is charged for them."""
        model = place.job.request.model
        entry = self.client.service.catalog.models.get(model)
        nsfw = entry is not None and entry.nsfw
        flagged = frozenset(i for i, image in enumerate(result.images) if image.withheld)
        shown = flagged if self.client.settings.nsfw_channels == "allow" else frozenset()
        if not (nsfw or shown):
            return frozenset()
        if not await self._age_restricted(place):
            if nsfw:
                raise Undeliverable(f"{model} posts only in an age-restricted channel")
            return frozenset()
        place.channel_only = True
        for index in shown:
            result.images[index].withheld = False
        return shown

    async def _age_restricted(self, place: Place) -> bool:
        """Whether the result goes to the job's channel (a follow-up or a post there, not a
        DM) and Discord marks that channel age-restricted now."""
        if place.job.channel_id is None or (place.private and not place.followup_open):
            return False
        try:
            return age_restricted(await self._channel(place.job.channel_id))
        except discord.HTTPException:
            return False

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
        if sent is None and interaction is not None and place.followup_open:
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
            sent = await self._post_outside_interaction(place, message, part)
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
        first_line = f"<@{job.member_id}> job #{job.id}"
        try:
            channel = await self._channel(job.channel_id)
            async for message in channel.history(limit=50):
                if (
                    message.author == self.client.user
                    and message.content.split("\n")[0] == first_line
                ):
                    return message
        except discord.HTTPException:
            pass
        return None

    async def _post_outside_interaction(
        self, place: Place, message: dict[str, Any], part: int = 0
    ) -> discord.Message | None:
        """Post in the job's channel (once: the nonce), else by DM when the channel is
        closed to us or the results are private (never adult content); None when neither
        works."""
        job = place.job
        nonce = f"imagine-job-{job.id}" + (f"-{part}" if part else "")
        if not place.private:
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
        if place.channel_only and message.get("files"):
            raise Undeliverable("its images are posted only in an age-restricted channel")
        try:
            member = await self.client.fetch_user(job.member_id)
            return await member.send(**message)
        except discord.HTTPException as error:
            if too_large(error):
                raise
            log.warning("cannot deliver job %s to member %s at all", job.id, job.member_id)
            return None
