"""The status message under each request: queue position and ETA while waiting, a step bar
(and a small preview) while generating, and a Cancel button. Edits are coalesced and
throttled: the newest text wins, and Discord never sees more edits than its limits allow."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
from dataclasses import dataclass, field
from typing import Any

import discord

from bot.eta import estimate_waits
from bot.service import ImagineService
from bot.throttle import EditThrottle

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.5
BAR_WIDTH = 12


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
    notes: list[str] = field(default_factory=list)
    private: bool = False
    preview: bytes | None = None
    dirty: bool = False
    shown: str = ""
    message: discord.Message | None = None
    origin: discord.Message | None = None
    gone: bool = False  # someone deleted the status message: stop editing it

    async def edit(self, **fields: Any) -> None:
        if self.interaction is not None:
            await self.interaction.edit_original_response(**fields)
        elif self.message is not None:
            await self.message.edit(**fields)

    async def delete(self) -> None:
        if self.interaction is not None:
            await self.interaction.delete_original_response()
        elif self.message is not None:
            await self.message.delete()

    def render(self) -> str:
        headline = f"{self.headline}: {self.detail}" if self.detail else self.headline
        return "\n".join([headline, *self.notes])


class CancelButton(discord.ui.DynamicItem[discord.ui.Button], template=r"cancel:(?P<job>\d+)"):
    """Cancel on a status message; the job id in its custom_id makes it work after a restart."""

    def __init__(self, job_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Cancel", style=discord.ButtonStyle.secondary, custom_id=f"cancel:{job_id}"
            )
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]
    ) -> CancelButton:
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        service: ImagineService = interaction.client.service
        record = await service.store.job(self.job_id)
        if record is None:
            await interaction.response.send_message("That job no longer exists.", ephemeral=True)
            return
        owner = record.job.member_id == interaction.user.id
        moderator = interaction.guild_id is not None and interaction.permissions.manage_guild
        if not (owner or moderator):
            await interaction.response.send_message(
                "Only the member who asked (or a moderator) can cancel this job.", ephemeral=True
            )
            return
        outcome = await service.store.request_cancel(self.job_id)
        board: StatusBoard | None = getattr(interaction.client, "status_board", None)
        if outcome == "cancelled":
            if board is not None:
                board.forget(self.job_id)
            await interaction.response.edit_message(
                content=f"Job #{self.job_id} was cancelled; its images were refunded.",
                view=None,
                attachments=[],
            )
        elif outcome == "stopping":
            service.executor.note_cancelled(self.job_id)
            await interaction.response.send_message(
                f"Job #{self.job_id} is running; its images will be dropped and refunded.",
                ephemeral=True,
            )
        else:
            await interaction.response.send_message(
                f"Job #{self.job_id} has already finished.", ephemeral=True
            )


def cancel_view(job_id: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(CancelButton(job_id))
    return view


class StatusBoard:
    """Tracks the status message of every job admitted in this process."""

    def __init__(self, service: ImagineService, throttle: EditThrottle | None = None) -> None:
        self.service = service
        self.throttle = throttle or EditThrottle()
        self.statuses: dict[int, Status] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._flush_forever(), name="status-board")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def track(self, status: Status) -> None:
        status.shown = status.render()
        self.statuses[status.job_id] = status

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

    async def refresh_queue(self) -> None:
        """Recompute positions and ETAs of the queued jobs this process is showing."""
        if not self.statuses:
            return
        queued = await self.service.store.pending_jobs()
        speeds = await self.service.store.speeds()
        busy_for = self.service.executor.expected_remaining()
        waits = estimate_waits(queued, speeds, self.service.settings.max_batch_size, busy_for)
        for position, job in enumerate(queued, start=1):
            if job.id in self.statuses:
                self.set_detail(job.id, position_text(position, waits.get(job.id)))

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
        return sent

    async def _flush_forever(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
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
