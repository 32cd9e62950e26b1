"""The status message that follows a job through the queue: its place and ETA while it waits,
a step bar (and a small preview) while it runs, and its end when the result is posted. Edits
are coalesced and throttled: the newest text wins, and Discord never sees more edits than its
limits allow."""

from __future__ import annotations

import asyncio
import io
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import discord

from bot.background import cancel_and_wait
from bot.service import ImagineService
from bot.throttle import EditThrottle

log = logging.getLogger(__name__)

FLUSH_INTERVAL = 0.5
# Queued statuses whose place and ETA are recomputed per tick, in turns: a long queue costs
# each tick the same, and admission never waits on it.
REFRESH_PER_TICK = 25
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
    or, for a request made by replying to a message, `message`, the bot's reply to `reply_to`."""

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
    reply_to: discord.Message | None = None  # the member's message, for a reply
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
