"""Admission and the executor, shared by the Discord cogs and the command line.

Knows nothing of Discord: a cog turns an interaction into `RawOptions` and a member id,
and registers a listener to hear about finished jobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Protocol

from bot.db import Store, admission, jobs, members, moderation, quotas, speeds
from bot.db.members import MemberDefaults
from bot.eta import estimate_waits
from bot.executor import Executor, JobResult, Progress, ProgressListeners, Runner
from bot.handoff import Undeliverable
from bot.images import decode_upload, fit_for_model, png_bytes, read_parameters
from bot.quota import MemberBanned, PromptBlocked, ShuttingDown
from bot.requests import MAX_PROMPT_TOKENS, GenerationRequest, Job, RawOptions, validate
from bot.settings import Settings

log = logging.getLogger(__name__)

# A job claimed this many times without finishing is failed and refunded at start-up.
MAX_ATTEMPTS = 3

# Uploads are decoded here, two at a time: a flood of them queues up instead of taking every
# thread of the default pool (which the database connection and Discord's client share too).
DECODE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode-upload")


class ModelRunner(Runner, Protocol):
    def load(self, model: str) -> None: ...

    def token_count(self, model: str, prompt: str) -> int: ...


@dataclass(frozen=True)
class Admission:
    """What a member is told right after asking: the job, where it stands, and any caveats."""

    job: Job
    position: int
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PreparedImage:
    """An upload checked, decoded and resized for the model, as PNG bytes and their hash."""

    png: bytes
    hash: str
    width: int
    height: int


Listener = Callable[[JobResult], Awaitable[None]]


class ImagineService:
    def __init__(self, settings: Settings, store: Store, runner: ModelRunner) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self._listeners: list[Listener] = []
        self._progress = ProgressListeners()
        self.accepting = True
        self._closed = False
        self.executor = Executor(
            store,
            runner,
            max_batch_size=settings.max_batch_size,
            deliver=self._announce,
            progress=self._progress,
            preview_every=settings.preview_every,
        )

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def add_progress_listener(self, listener: Progress) -> None:
        """`listener(job_ids, done, total, previews)` hears every step of the running call."""
        self._progress.add(listener)

    def remove_progress_listener(self, listener: Progress) -> None:
        self._progress.remove(listener)

    async def load_model(self) -> None:
        """Load the model in the worker thread; a second call costs nothing."""
        await self.executor.run_in_worker(self.runner.load, self.settings.model_id)

    async def start(self) -> None:
        """Load the model in the worker thread (a missing model fails here, not on a member's
        first request), put interrupted jobs back in the queue, and start draining it."""
        await self.load_model()
        requeued, failed = await self.store.write(jobs.recover_interrupted, MAX_ATTEMPTS)
        if requeued:
            log.info("put %d interrupted job(s) back in the queue", requeued)
        for job in failed:
            record = await self.store.read(jobs.get, job.id)
            await self._announce(JobResult(job, [], record.error, 0.0, job.batch_id or 0, 0))
        self.executor.start()

    async def close(self, grace: float = 0.0) -> None:
        """Stop admitting, let the running batch finish within `grace` seconds (or return its
        jobs to the queue), and close the database cleanly."""
        if self._closed:
            return  # a signal closed it already; this is the normal exit path
        self._closed = True
        self.accepting = False
        await self.executor.stop(grace)
        await self.store.close()

    def validate(
        self, raw: RawOptions, init_image: PreparedImage | None = None
    ) -> GenerationRequest:
        """Raise InvalidRequest before anything is stored or charged."""
        shape = (
            None if init_image is None else (init_image.hash, init_image.width, init_image.height)
        )
        return validate(raw, self.settings.limits, self.settings.model_id, init_image=shape)

    async def prepare_init_image(self, data: bytes) -> PreparedImage:
        """Check and decode an uploaded image (raises ImageRejected), resized to a size the
        model takes. Nothing is stored until the request using it is admitted."""
        limits = self.settings.limits

        def prepare() -> PreparedImage:
            image = decode_upload(
                data,
                max_bytes=self.settings.max_upload_bytes,
                max_pixels=self.settings.max_upload_pixels,
            )
            fitted = fit_for_model(
                image,
                min_side=limits.min_side,
                max_side=limits.max_side,
                default_area=limits.default_width * limits.default_height,
            )
            png = png_bytes(fitted)
            return PreparedImage(png, hashlib.sha256(png).hexdigest(), *fitted.size)

        return await asyncio.get_running_loop().run_in_executor(DECODE_POOL, prepare)

    async def image_parameters(self, data: bytes) -> dict | None:
        """The A1111 parameters a member's PNG carries, read on the upload pool: its text is
        bounded and parsed in linear time, but a PNG can still carry a megabyte of it."""
        return await asyncio.get_running_loop().run_in_executor(DECODE_POOL, read_parameters, data)

    async def check_member(self, guild_id: int, member_id: int, prompt: str | None) -> None:
        """Raise MemberBanned (or PromptBlocked, when the prompt is known) before any slow work
        on a request; admission checks again, in its transaction."""
        if (ban := await self.store.read(moderation.ban_of, guild_id, member_id)) is not None:
            raise MemberBanned(ban.reason)
        if prompt and (term := await self.store.read(moderation.blocked_term_in, guild_id, prompt)):
            raise PromptBlocked(term)

    async def with_member_defaults(
        self, raw: RawOptions, member_id: int
    ) -> tuple[RawOptions, MemberDefaults]:
        """Fill options the member left out from their /settings; the rest fall through to the
        server's defaults in validation."""
        defaults = await self.store.read(members.defaults, member_id)
        filled = replace(
            raw,
            steps=defaults.steps if raw.steps is None else raw.steps,
            width=defaults.width if raw.width is None else raw.width,
            height=defaults.height if raw.height is None else raw.height,
            scheduler=defaults.scheduler if raw.scheduler is None else raw.scheduler,
            negative_prompt=(
                defaults.negative_prompt if raw.negative_prompt is None else raw.negative_prompt
            ),
            count=defaults.count if raw.count is None else raw.count,
        )
        return filled, defaults

    def prompt_notes(self, request: GenerationRequest) -> list[str]:
        notes = []
        for label, text in (
            ("prompt", request.prompt),
            ("negative prompt", request.negative_prompt),
        ):
            tokens = self.runner.token_count(request.model, text) if text else 0
            if tokens > MAX_PROMPT_TOKENS:
                notes.append(
                    f"The {label} is {tokens} tokens long; the model reads the first "
                    f"{MAX_PROMPT_TOKENS}, so the rest is ignored."
                )
        return notes

    async def submit(
        self,
        request: GenerationRequest,
        *,
        member_id: int,
        guild_id: int | None = None,
        channel_id: int | None = None,
        interaction_id: int | None = None,
        exempt: bool = False,
        parent: tuple[int, int] | None = None,
        init_image: PreparedImage | None = None,
    ) -> Admission:
        """Admit a validated request: raises AdmissionRefused (restarting, banned, blocked,
        over quota) without storing or charging anything."""
        if not self.accepting:
            raise ShuttingDown()
        job = await self.store.write(
            admission.admit,
            request,
            member_id=member_id,
            guild_id=guild_id,
            channel_id=channel_id,
            interaction_id=interaction_id,
            default_limit=self.settings.daily_quota,
            exempt=exempt,
            parent=parent,
            init_png=None if init_image is None else init_image.png,
        )
        self.executor.wake()
        position = await self.store.read(jobs.position, job.id)
        return Admission(job, position, self.prompt_notes(request))

    async def estimate_wait(self, request: GenerationRequest) -> float | None:
        """Seconds until a request admitted now would be done, from measured speed."""
        newcomer = Job(-1, 0, None, None, request, queued_at=float("inf"))
        _, waits = await self.queue_waits(newcomer)
        return waits[-1]

    async def queue_waits(
        self, newcomer: Job | None = None
    ) -> tuple[list[Job], dict[int, float | None]]:
        """The queued jobs in order and, by job id, seconds until each would be done (from
        measured speed); a `newcomer` counts as queued last."""
        queued = await self.store.read(jobs.pending)
        measured = await self.store.read(speeds.measured)
        waits = estimate_waits(
            queued if newcomer is None else [*queued, newcomer],
            measured,
            self.settings.max_batch_size,
            self.executor.expected_remaining(),
        )
        return queued, waits

    async def quota(self, guild_id: int | None, member_id: int, *, exempt: bool = False):
        return await self.store.read(
            quotas.status,
            guild_id,
            member_id,
            default_limit=self.settings.daily_quota,
            exempt=exempt,
        )

    async def cancel(self, job_id: int) -> jobs.CancelOutcome:
        """Cancel and refund a queued job at once; a running one's images are dropped (and
        refunded) when its call ends."""
        outcome = await self.store.write(jobs.request_cancel, job_id)
        if outcome is jobs.CancelOutcome.STOPPING:
            self.executor.note_cancelled(job_id)
        return outcome

    async def forget_member(self, member_id: int) -> int:
        """Delete a member's prompts and parameters, from the write-ahead log too; raises
        members.JobStillRunning while one of their jobs runs. Returns the jobs deleted."""
        deleted = await self.store.write(members.forget, member_id)
        await self.store.checkpoint()
        return deleted

    def is_exempt(self, role_ids: list[int]) -> bool:
        return not self.settings.quota_exempt_roles.isdisjoint(role_ids)

    async def _announce(self, result: JobResult) -> None:
        """Tell every listener. A listener's `Undeliverable` reaches the executor after the
        others have heard, so the job fails with a refund instead of being marked done."""
        undeliverable = None
        for listener in list(self._listeners):
            try:
                await listener(result)
            except Undeliverable as problem:
                undeliverable = problem
            except Exception:
                log.exception("a listener failed on job %s", result.job.id)
        if undeliverable is not None:
            raise undeliverable
