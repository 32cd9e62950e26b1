"""How a Discord request enters the queue, and the status message that follows it there.

`AdmissionDesk` is the one way in for /imagine, Confirm, the buttons, the context menu and
replies: read an attached image, fill the member's defaults, validate, admit, and answer with
the status message. `StatusBoard` keeps those messages current: queue position and ETA while
waiting, a step bar (and a small preview) while generating. Edits are coalesced and throttled:
the newest text wins, and Discord never sees more edits than its limits allow."""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import discord

from bot.background import cancel_and_wait
from bot.db import members
from bot.images import ImageRejected
from bot.quota import AdmissionRefused
from bot.requests import GenerationRequest, InvalidRequest, Job, RawOptions
from bot.service import ImagineService, PreparedImage
from bot.throttle import EditThrottle
from cogs.buttons import cancel_view
from cogs.common import ONLY_IN_SERVERS, AdmittedButUnanswered, refusal_text, refuse, role_ids

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.5
# Queued statuses whose place and ETA are recomputed per tick, in turns: a long queue costs
# each tick the same, and admission never waits on it.
REFRESH_PER_TICK = 25
BAR_WIDTH = 12

Origin = discord.Interaction | discord.Message


def member_of(origin: Origin) -> discord.User | discord.Member:
    return origin.user if isinstance(origin, discord.Interaction) else origin.author


def step_bar(done: int, total: int) -> str:
    filled = round(BAR_WIDTH * done / max(total, 1))
    return f"`{'█' * filled}{'░' * (BAR_WIDTH - filled)}` step {done}/{total}"


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "ETA unknown until the first batch has run"
    if seconds < 60:
        return f"about {max(1, round(seconds))} s"
    return f"about {round(seconds / 60)} min"


def position_text(position: int, wait: float | None) -> str:
    where = "next in line" if position <= 1 else f"position {position} in the queue"
    return f"{where}, {eta_text(wait)}"


@dataclass
class Status:
    """One job's status message. It is the response to `interaction` (a command or button),
    or, for a request made by replying to a message, `message`, the bot's reply to `origin`."""

    job_id: int
    member_id: int
    interaction: discord.Interaction | None
    arrived: float  # time.monotonic() when the request arrived: a token lives 15 minutes
    headline: str
    detail: str = ""
    private: bool = False
    preview: bytes | None = None
    dirty: bool = False
    shown: str = ""
    message: discord.Message | None = None
    origin: discord.Message | None = None
    gone: bool = False  # someone deleted the status message: stop editing it

    async def edit(self, **fields: Any) -> None:
        if self.message is not None:  # a reply, or a follow-up for a second job of a prompt
            await self.message.edit(**fields)
        elif self.interaction is not None:
            await self.interaction.edit_original_response(**fields)

    async def delete(self) -> None:
        if self.message is not None:
            await self.message.delete()
        elif self.interaction is not None:
            await self.interaction.delete_original_response()

    def render(self) -> str:
        headline = f"{self.headline}: {self.detail}" if self.detail else self.headline
        return headline


class StatusBoard:
    """Tracks the status message of every job admitted in this process. Interactions (and
    their tokens, which are secrets) live in memory only."""

    def __init__(self, service: ImagineService, throttle: EditThrottle | None = None) -> None:
        self.service = service
        self.throttle = throttle or EditThrottle()
        self.statuses: dict[int, Status] = {}
        self._turns: deque[int] = deque()  # queued statuses, next to refresh on the left
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever(), name="status-board")

    async def stop(self) -> None:
        await cancel_and_wait(self._task)

    def track(self, status: Status) -> None:
        status.shown = status.render()
        self.statuses[status.job_id] = status
        self._turns.append(status.job_id)

    def forget(self, job_id: int) -> Status | None:
        self.throttle.forget(job_id)
        return self.statuses.pop(job_id, None)

    def set_detail(self, job_id: int, detail: str, preview: bytes | None = None) -> None:
        status = self.statuses.get(job_id)
        if status is None:
            return
        status.detail = detail
        if preview is not None:
            status.preview = preview
        status.dirty = status.render() != status.shown or preview is not None

    async def refresh_queue(self, limit: int = REFRESH_PER_TICK) -> int:
        """Recompute the place and ETA of up to `limit` queued statuses, taking turns;
        statuses no longer queued leave the rotation. Returns how many were looked at."""
        chosen: list[int] = []
        for _ in range(len(self._turns)):
            if len(chosen) >= limit:
                break
            job_id = self._turns.popleft()
            if job_id in self.statuses and job_id in self.service.queue:
                chosen.append(job_id)
                self._turns.append(job_id)
        estimates = await self.service.queue_estimates(chosen)
        for job_id, (place, wait) in estimates.items():
            self.set_detail(job_id, position_text(place, wait))
        return len(chosen)

    def on_progress(
        self, job_ids: list[int], done: int, total: int, previews: dict[int, bytes] | None
    ) -> None:
        for job_id in job_ids:
            preview = previews.get(job_id) if previews else None
            self.set_detail(job_id, f"generating {step_bar(done, total)}", preview)

    async def flush(self) -> int:
        """Send the edits that are due and allowed; returns how many were sent."""
        sent = 0
        for status in list(self.statuses.values()):
            if status.gone or not status.dirty or not self.throttle.allow(status.job_id):
                continue
            status.dirty = False
            text = status.render()
            files = []
            if status.preview is not None:
                files = [discord.File(io.BytesIO(status.preview), "preview.png")]
            try:
                await status.edit(content=text, attachments=files)
                status.shown = text
                sent += 1
            except discord.NotFound:  # deleted: stop editing it, still deliver the result
                status.gone = True
            except discord.HTTPException as error:
                log.info("status edit for job %s failed: %s", status.job_id, error)
            except Exception:  # logged with the job; the other statuses are still edited
                log.exception("status edit for job %s failed", status.job_id)
        return sent

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.refresh_queue()
                await self.flush()
            except Exception:
                log.exception("status flush failed")

    async def finish(self, job_id: int, text: str | None) -> None:
        """The result is posted: replace the status with `text`, or delete it (None)."""
        status = self.forget(job_id)
        if status is None or status.gone:
            return
        try:
            if text is None:
                await status.delete()
            else:
                await status.edit(content=text, attachments=[], view=None)
        except discord.HTTPException as error:
            log.info("final status edit for job %s failed: %s", job_id, error)


class AdmissionDesk:
    """Every Discord request passes here, so quotas, refusals and the status message are the
    same whether it came from /imagine, a button, the context menu or a reply."""

    def __init__(self, service: ImagineService, board: StatusBoard) -> None:
        self.service = service
        self.board = board

    def strength(self, kind: str) -> float:
        """How far a "subtle" or "strong" variation moves from its image."""
        settings = self.service.settings
        return settings.vary_subtle if kind == "subtle" else settings.vary_strong

    def guild_of(self, origin: Origin, guild_id: int | None = None) -> int | None:
        """The server whose rules apply: `guild_id` when given (a button on a result delivered
        by DM belongs to its job's server), else where the request was made (None in a DM)."""
        if guild_id is not None:
            return guild_id
        return origin.guild.id if origin.guild else None

    async def private_for(self, origin: Origin) -> bool:
        """Whether the member wants results privately (only an interaction can answer so)."""
        defaults = await self.service.store.read(members.defaults, member_of(origin).id)
        return defaults.private and isinstance(origin, discord.Interaction)

    async def read_image(
        self,
        origin: Origin,
        attachment: discord.Attachment,
        *,
        guild_id: int | None = None,
        prompt: str | None = None,
        prepare: Callable[[bytes], Awaitable[PreparedImage]] | None = None,
    ) -> PreparedImage | None:
        """Download (after checking the announced size, the ban list and, when `prompt` is
        known, the blocklist) and prepare an image (as an upload for the model, unless
        `prepare` says otherwise: Upscale, Zoom Out and Pan make their own start picture), or
        tell the member why not and return None. An interaction is deferred first, privately:
        downloading and decoding can outlast Discord's 3 seconds."""
        limit = self.service.settings.max_upload_bytes
        if attachment.size > limit:
            await refuse(
                origin,
                f"The image is {attachment.size / 2**20:.1f} MiB; the limit is "
                f"{limit / 2**20:g} MiB. Nothing was queued.",
            )
            return None
        guild = self.guild_of(origin, guild_id)
        if guild is None:
            await refuse(origin, ONLY_IN_SERVERS)
            return None
        try:  # a banned member's upload is not even downloaded
            await self.service.check_member(guild, member_of(origin).id, prompt)
        except AdmissionRefused as problem:
            await refuse(origin, refusal_text(problem))
            return None
        if isinstance(origin, discord.Interaction) and not origin.response.is_done():
            await origin.response.defer(ephemeral=True, thinking=True)
        try:
            return await (prepare or self.service.prepare_init_image)(await attachment.read())
        except ImageRejected as problem:
            await refuse(origin, f"{problem} Nothing was queued.")
        except discord.HTTPException:
            await refuse(origin, "I could not download that image; please try again.")
        return None

    async def checked(
        self, origin: Origin, raw: RawOptions, image: PreparedImage | None = None
    ) -> tuple[GenerationRequest, bool] | None:
        """The request with the member's /settings filled in and validated, and whether they
        want results privately (only an interaction can answer privately); or None after
        telling them what is wrong."""
        raw, defaults = await self.service.with_member_defaults(raw, member_of(origin).id)
        try:
            request = self.service.validate(raw, image)
        except InvalidRequest as problem:
            await refuse(origin, refusal_text(problem))
            return None
        return request, defaults.private and isinstance(origin, discord.Interaction)

    async def queue(
        self,
        origin: Origin,
        raw: RawOptions,
        image: PreparedImage | None = None,
        *,
        parent: tuple[int, int] | None = None,
        guild_id: int | None = None,
    ) -> Job | None:
        """Check the options, then admit them (see `checked` and `admit`)."""
        checked = await self.checked(origin, raw, image)
        if checked is None:
            return None
        request, private = checked
        return await self.admit(
            origin, request, private=private, parent=parent, init_image=image, guild_id=guild_id
        )

    async def admit(
        self,
        origin: Origin,
        request: GenerationRequest,
        *,
        private: bool = False,
        arrived: float | None = None,
        parent: tuple[int, int] | None = None,
        init_image: PreparedImage | None = None,
        guild_id: int | None = None,
        followup: bool = False,
    ) -> Job | None:
        """Admit a checked request (one short SQLite transaction, well inside Discord's 3
        seconds), then answer with the status message, as the interaction's response (filling
        in a deferred one; a `followup` for the second job of an interaction) or as a reply to
        the member's message. Answering after admission lets a refusal stay private. Nothing is
        admitted outside a server: a DM has no rules."""
        interaction = origin if isinstance(origin, discord.Interaction) else None
        member = member_of(origin)
        guild = self.guild_of(origin, guild_id)
        if guild is None:
            await refuse(origin, ONLY_IN_SERVERS)
            return None
        try:
            admission = await self.service.submit(
                request,
                member_id=member.id,
                guild_id=guild,
                channel_id=origin.channel.id,
                interaction_id=interaction.id if interaction else None,
                exempt=self.service.is_exempt(role_ids(member)),
                parent=parent,
                init_image=init_image,
                weight=self.service.weight_of(role_ids(member)),
            )
        except AdmissionRefused as problem:
            await refuse(origin, refusal_text(problem))
            return None
        job = admission.job
        status = Status(
            job.id,
            job.member_id,
            interaction,
            time.monotonic() if arrived is None else arrived,
            headline=f"Queued as job #{job.id}",
            detail=position_text(admission.position, None),
            private=private,
            origin=None if interaction else origin,
        )
        self.board.track(status)
        try:
            estimates = await self.service.queue_estimates([job.id])
            if job.id in estimates:
                status.detail = position_text(*estimates[job.id])
            await self._answer(origin, status, followup=followup)
        except Exception as error:
            raise AdmittedButUnanswered(job.id) from error
        status.shown, status.dirty = status.render(), False
        return job

    async def _answer(self, origin: Origin, status: Status, *, followup: bool) -> None:
        view, quiet = cancel_view(status.job_id), discord.AllowedMentions.none()
        if not isinstance(origin, discord.Interaction):
            status.message = await origin.reply(
                status.render(), view=view, mention_author=False, allowed_mentions=quiet
            )
        elif followup:
            status.message = await origin.followup.send(
                status.render(),
                view=view,
                ephemeral=status.private,
                allowed_mentions=quiet,
                wait=True,
            )
        elif origin.response.is_done():  # deferred while an image was read
            await origin.edit_original_response(content=status.render(), view=view)
        else:
            await origin.response.send_message(
                status.render(), view=view, ephemeral=status.private, allowed_mentions=quiet
            )
