"""Admission and the executor, shared by the Discord cogs and the command line.

Knows nothing of Discord: a cog turns an interaction into `RawOptions` and a member id,
and registers a listener to hear about finished jobs.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Protocol

from bot.db import Store, admission, jobs, members, moderation, quotas, speeds
from bot.db.members import MemberDefaults
from bot.downloads import ModelNotAvailable, missing_sources
from bot.eta import seconds_per_unit, wait_seconds
from bot.executor import Executor, ExecutorTuning, JobResult, Outlets, Runner
from bot.handoff import Undeliverable
from bot.images import decode_upload, fit_for_model, png_bytes, read_parameters
from bot.metrics import Metrics, counting_refusals
from bot.models import Catalog, load_catalog
from bot.prompts import parse_weights
from bot.queue import QueueIndex
from bot.quota import MemberBanned, PromptBlocked, ShuttingDown
from bot.ray_workers import workers_for
from bot.requests import GenerationRequest, InvalidRequest, Job, RawOptions, validate
from bot.settings import Settings
from bot.workers import ProgressListener, ProgressListeners

log = logging.getLogger(__name__)

# A job claimed this many times without finishing is failed and refunded at start-up.
MAX_ATTEMPTS = 3

# Uploads are decoded here, two at a time: a flood of them queues up instead of taking every
# thread of the default pool (which the database connection and Discord's client share too).
DECODE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode-upload")


class ModelRunner(Runner, Protocol):
    def load(self, model: str) -> None: ...

    def prompt_chunks(self, model: str, prompt: str) -> int: ...


def prompt_chunks(runner: ModelRunner, request: GenerationRequest, limit: int) -> tuple[int, int]:
    """The 75-token chunks of the prompt and of the negative prompt. Raises InvalidRequest
    on a weight syntax error or past `limit` (MAX_PROMPT_CHUNKS) chunks."""
    counts = []
    for option, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
        parse_weights(text, option)  # refused here, naming the option and the position
        chunks = runner.prompt_chunks(request.model, text)
        if chunks > limit:
            raise InvalidRequest(
                option,
                f"takes {chunks} chunks of 75 tokens; at most {limit} are allowed "
                "(each `BREAK` starts a chunk too). Shorten it.",
            )
        counts.append(chunks)
    return counts[0], counts[1]


def saved_defaults(raw: RawOptions, saved: MemberDefaults, catalog: Catalog) -> RawOptions:
    """`raw` with the options the member left out taken from their /settings: their model while
    the owner still offers it, then the rest except what the model sets itself (a Turbo
    model's steps, an SDXL model's size), which a default saved for another model would only
    make fail."""
    if raw.model is None and saved.model in {m.name for m in catalog.usable_models()}:
        raw = replace(raw, model=saved.model)
    own = catalog.own_defaults(raw.model)
    missing = {
        name: getattr(saved, name)
        for name in ("steps", "width", "height", "scheduler", "negative_prompt", "count")
        if getattr(raw, name) is None and name not in own
    }
    return replace(raw, **missing)


@dataclass(frozen=True)
class Admission:
    """What a member is told right after asking: the job and where it stands."""

    job: Job
    position: int


@dataclass(frozen=True)
class PreparedImage:
    """A start picture as PNG bytes and their hash. A member's upload (`upload_size`, its size
    as uploaded) is kept at the largest model's area and drawn at each model's own
    (`fitted_size`); a picture made for a job (Upscale, Zoom Out, Pan, a Reroll) is drawn at
    its own size."""

    png: bytes
    hash: str
    width: int
    height: int
    upload_size: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[str, int, int]:
        """What validation needs of it: (hash, width, height)."""
        return self.hash, self.width, self.height


Listener = Callable[[JobResult], Awaitable[None]]


def prepare_upload(data: bytes, settings: Settings, catalog: Catalog) -> PreparedImage:
    """Check and decode a member's upload (raises ImageRejected), resized for the model with
    the largest default area: whichever model draws it, the runner then only shrinks it."""
    image = decode_upload(
        data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_upload_pixels
    )
    largest = max(
        (catalog.limits_for(m.name, settings.limits) for m in catalog.usable_models()),
        key=lambda limits: limits.default_width * limits.default_height,
        default=settings.limits,
    )
    fitted = fit_for_model(image, largest)
    png = png_bytes(fitted)
    return PreparedImage(png, hashlib.sha256(png).hexdigest(), *fitted.size, image.size)


def require_default_model(catalog: Catalog) -> None:
    """Start-up fails, naming the command that fetches it, when the default model is missing
    here (with EXECUTOR=ray the workers load it, so the bot's own runner never tries)."""
    default = catalog.models[catalog.default]
    if default.source in catalog.missing:
        raise ModelNotAvailable(
            f"Model {default.source!r} is not on this machine; fetch it with "
            "`python -m bot download`, then start the bot again."
        )


class ImagineService:
    def __init__(
        self, settings: Settings, store: Store, runner: ModelRunner, catalog: Catalog | None = None
    ) -> None:
        self.settings = settings
        self.store = store
        self.runner = runner
        self.catalog = catalog or load_catalog(settings.models_file, settings.model_id)
        self._listeners: list[Listener] = []
        self._progress = ProgressListeners()
        self.accepting = True
        self._closed = False
        self.queue = QueueIndex()
        self.metrics = Metrics(self.queue)
        self.executor = Executor(
            store,
            runner,
            self.queue,
            ExecutorTuning(settings.max_batch_size, settings.preview_every, MAX_ATTEMPTS),
            Outlets(self._announce, self._progress),
            workers=workers_for(settings, runner, self.catalog),
            metrics=self.metrics,
        )

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def add_progress_listener(self, listener: ProgressListener) -> None:
        """`listener(job_ids, done, total, previews)` hears every step of the running call."""
        self._progress.add(listener)

    def remove_progress_listener(self, listener: ProgressListener) -> None:
        self._progress.remove(listener)

    async def load_model(self) -> None:
        """Note the allowlisted sources not here (refused to members); load the default model."""
        sources, cache = self.catalog.sources(), self.settings.model_cache
        self.catalog.missing = await asyncio.to_thread(missing_sources, sources, cache)
        if self.settings.executor == "ray":
            require_default_model(self.catalog)  # each worker loads it, on its own device
        else:
            await self.executor.run_in_worker(self.runner.load, self.catalog.default)

    async def start(self) -> None:
        """Load the model in the worker thread (a missing model fails here, not on a member's
        first request), put interrupted jobs back in the queue, and start draining it."""
        await self.load_model()
        requeued, failed = await self.store.write(jobs.recover_interrupted, MAX_ATTEMPTS)
        if requeued:
            log.info("put %d interrupted job(s) back in the queue", requeued)
        await self.executor.reload_queue()
        for job in failed:
            record = await self.store.read(jobs.get, job.id)
            await self._announce(JobResult(job, [], record.error, 0.0, job.batch_id or 0, 0))
        self.executor.start()
        if self.settings.metrics_port is not None:
            await self.metrics.serve(self.settings.metrics_port)

    async def close(self, grace: float = 0.0) -> None:
        """Stop admitting, let the running batch finish within `grace` seconds (or return its
        jobs to the queue), and close the database cleanly."""
        if self._closed:
            return  # a signal closed it already; this is the normal exit path
        self._closed = True
        self.accepting = False
        await self.executor.stop(grace)
        await self.metrics.close()
        await self.store.close()

    @counting_refusals
    def validate(
        self, raw: RawOptions, init_image: PreparedImage | None = None
    ) -> GenerationRequest:
        """Raise InvalidRequest before anything is stored or charged: an option out of bounds,
        a weight syntax error, or a prompt longer than MAX_PROMPT_CHUNKS chunks."""
        shape = init_image and init_image.shape
        upload_size = init_image and init_image.upload_size
        request = validate(
            raw, self.settings.limits, self.catalog, init_image=shape, upload_size=upload_size
        )
        prompt_chunks(self.runner, request, self.settings.max_prompt_chunks)
        return request

    async def prepare_init_image(self, data: bytes) -> PreparedImage:
        """`prepare_upload` on the upload pool. Nothing is stored until the request using it
        is admitted."""
        prepare = functools.partial(prepare_upload, data, self.settings, self.catalog)
        return await asyncio.get_running_loop().run_in_executor(DECODE_POOL, prepare)

    async def image_parameters(self, data: bytes) -> dict | None:
        """The A1111 parameters a member's PNG carries, read on the upload pool: its text is
        bounded and parsed in linear time, but a PNG can still carry a megabyte of it."""
        return await asyncio.get_running_loop().run_in_executor(DECODE_POOL, read_parameters, data)

    @counting_refusals
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
        """Fill options the member left out from their /settings (see `saved_defaults`); the
        rest fall through to the model's and the server's defaults in validation."""
        defaults = await self.store.read(members.defaults, member_id)
        filled = saved_defaults(raw, defaults, self.catalog)
        return filled, defaults

    @counting_refusals
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
        weight: float = 1.0,
    ) -> Admission:
        """Admit a validated request: raises AdmissionRefused (restarting, banned, blocked,
        over the cost cap, too many jobs queued, over quota) without storing or charging
        anything. `weight` is the member's share of the device against others' (see
        `weight_of`)."""
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
            max_queued=self.settings.max_queued_per_member,
            max_cost=self.settings.max_request_cost,
            parent=parent,
            init_png=None if init_image is None else init_image.png,
            weight=weight,
        )
        self.queue.add(job)
        self.executor.wake()
        position, _ = self.queue.position(job.id) or (0, 0.0)
        return Admission(job, position)

    def resident_models(self) -> frozenset[str]:  # on any worker, for /models
        return self.executor.lanes.resident_models()

    def weight_of(self, role_ids: list[int]) -> float:
        """A member's fair-share weight: the largest of their roles' in ROLE_WEIGHTS, else 1."""
        weights = self.settings.role_weights
        return max([1.0, *(weights[role] for role in role_ids if role in weights)])

    async def estimate_wait(self, request: GenerationRequest, member_id: int) -> float | None:
        """Seconds until a request `member_id` makes now would be done, from measured speed."""
        units = self.queue.work_ahead_of_newcomer(member_id) + request.cost
        per_unit = await self._seconds_per_unit(request.model)
        return wait_seconds(units, per_unit, self.executor.expected_remaining())

    async def queue_estimates(self, job_ids: list[int]) -> dict[int, tuple[int, float | None]]:
        """For each still-queued job: its place (1 = next) and the seconds until it is done,
        from the work ahead of it in the queue index; one speed lookup for them all."""
        found: dict[int, tuple[int, float | None]] = {}
        per_unit: dict[str, float | None] = {}
        busy_for = self.executor.expected_remaining()
        for job_id in job_ids:
            place = self.queue.position(job_id)
            if place is None:
                continue
            model = self.queue.job(job_id).request.model
            if model not in per_unit:
                per_unit[model] = await self._seconds_per_unit(model)
            found[job_id] = (place[0], wait_seconds(place[1], per_unit[model], busy_for))
        return found

    async def _seconds_per_unit(self, model: str) -> float | None:
        """At the batch size calls are running at: full when the queue is long."""
        images = min(self.settings.max_batch_size, self.queue.images())
        return seconds_per_unit(await self.store.read(speeds.measured), model, images)

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
        if outcome is jobs.CancelOutcome.CANCELLED:
            self.queue.remove(job_id)
        if outcome is jobs.CancelOutcome.STOPPING:
            self.executor.note_cancelled(job_id)
        return outcome

    async def forget_member(self, member_id: int) -> int:
        """Delete a member's prompts and parameters, from the write-ahead log too; raises
        members.JobStillRunning while one of their jobs runs. Returns the jobs deleted."""
        deleted = await self.store.write(members.forget, member_id)
        for job in self.queue.jobs_of(member_id):
            self.queue.remove(job.id)
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
