"""Admission and the executor, shared by the Discord cogs and the command line.

Knows nothing of Discord: a cog turns an interaction into `RawOptions` and a member id,
and registers a listener to hear about finished jobs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from bot.db import Store, admission, jobs, members, moderation, quotas, speeds
from bot.db.members import MemberDefaults
from bot.downloads import ModelNotAvailable, missing_sources
from bot.eta import seconds_per_unit, wait_seconds
from bot.executor import Executor, ExecutorTuning, JobResult, Outlets, Runner
from bot.families import SIZE_STEPS, WEIGHTED_FAMILIES, family_name, model_family
from bot.gate import Gate
from bot.handoff import Undeliverable
from bot.images import read_parameters
from bot.intake import AdmissionCaps, Intake
from bot.metrics import Metrics, counting_refusals
from bot.models import Catalog, load_catalog
from bot.prompts import parse_weights
from bot.queue import QueueIndex
from bot.quota import ShuttingDown
from bot.ray_workers import workers_for
from bot.requests import GenerationRequest, InvalidRequest, Job, RawOptions, validate
from bot.settings import Settings
from bot.uploads import DECODE_POOL, PreparedImage, prepare_upload
from bot.workers import ProgressListener, ProgressListeners

log = logging.getLogger(__name__)

# A job claimed this many times without finishing is failed and refunded at start-up.
MAX_ATTEMPTS = 3


class DefaultsRefused(ValueError):
    """A /settings default that /imagine would refuse (the message names the option); nothing
    is saved."""


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


def check_family(request: GenerationRequest, family: str | None) -> None:
    """What the model's family cannot run, refused naming the model: weights and `BREAK`
    where the encoding does not read them (only SD's and SDXL's do; a flow model reads no
    negative prompt, so only the prompt counts), a size off the family's patch grid."""
    step = SIZE_STEPS.get(family or "", 8)
    for option, side in (("width", request.width), ("height", request.height)):
        if side % step:
            raise InvalidRequest(
                option,
                f"must be a multiple of {step} on {request.model}, a {family_name(family)} "
                f"model; got {request.width}×{request.height}.",
            )
    if family is None or family in WEIGHTED_FAMILIES:
        return
    segments = parse_weights(request.prompt)
    if len(segments) > 1 or any(f.weight != 1.0 for segment in segments for f in segment):
        raise InvalidRequest(
            "prompt",
            f"{request.model} is a {family_name(family)} model, which takes no weights such as "
            "`(word:1.2)`, `(word)` or `[word]` and no `BREAK` yet; write the prompt without "
            "them (`\\(` for a literal bracket).",
        )


def model_families(catalog: Catalog, cache: Path) -> dict[str, str | None]:
    """Each allowlisted model's family, from its files (those not on this machine left out)."""
    return {
        m.name: model_family(m.source, cache, m.revision)
        for m in catalog.models.values()
        if m.source not in catalog.missing
    }


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


Listener = Callable[[JobResult], Awaitable[None]]


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
        """The executor, queue index and metrics this service owns, over `runner`."""
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
        self.gate = Gate(settings, store, self.catalog, self.metrics)
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

    async def check_sources(self) -> None:
        """Note the allowlisted sources not here (refused to members) and each model's family
        (which validation needs), without loading any weights."""
        sources, cache = self.catalog.sources(), self.settings.model_cache
        self.catalog.missing = await asyncio.to_thread(missing_sources, sources, cache)
        families = await asyncio.to_thread(model_families, self.catalog, cache)
        self.catalog.learn_families(families)

    async def load_model(self) -> None:
        """Check the allowlisted sources (`check_sources`); load the default model."""
        await self.check_sources()
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
            await self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)

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
        check_family(request, self.catalog.models[request.model].family)
        prompt_chunks(self.runner, request, self.settings.max_prompt_chunks)
        return request

    def check_defaults(self, wanted: MemberDefaults) -> None:
        """Raise DefaultsRefused for defaults /imagine would refuse (the same checks), so a
        saved default can never be refused later."""
        raw = RawOptions(
            "check",
            negative_prompt=wanted.negative_prompt,
            steps=wanted.steps,
            width=wanted.width,
            height=wanted.height,
            scheduler=wanted.scheduler,
            count=wanted.count,
            model=wanted.model,
        )
        try:
            self.validate(raw)
        except InvalidRequest as problem:
            raise DefaultsRefused(str(problem)) from problem

    async def prepare_init_image(self, data: bytes) -> PreparedImage:
        """`prepare_upload` on the upload pool. Nothing is stored until the request using it
        is admitted."""
        prepare = functools.partial(prepare_upload, data, self.settings, self.catalog)
        return await asyncio.get_running_loop().run_in_executor(DECODE_POOL, prepare)

    async def image_parameters(self, data: bytes) -> dict | None:
        """The A1111 parameters a member's PNG carries, read on the upload pool: its text is
        bounded and parsed in linear time, but a PNG can still carry a megabyte of it."""
        return await asyncio.get_running_loop().run_in_executor(DECODE_POOL, read_parameters, data)

    async def member_defaults(self, member_id: int) -> MemberDefaults:
        """A member's /settings, read once per request: options they left out come from
        here (`saved_defaults`), and whether they want results privately."""
        return await self.store.read(members.defaults, member_id)

    @counting_refusals
    async def submit(
        self, request: GenerationRequest, intake: Intake, init_image: PreparedImage | None = None
    ) -> Admission:
        """Admit a validated request from `intake`: raises AdmissionRefused (restarting,
        banned, blocked, over the cost cap, too many jobs queued, over quota) without storing
        or charging anything."""
        if not self.accepting:
            raise ShuttingDown()
        self.catalog.check_audience(request.model, intake.age_restricted)
        await self.gate.check_request(intake, request)
        png = None if init_image is None else init_image.png
        caps = AdmissionCaps.of(self.settings)
        job = await self.store.write(admission.admit, request, intake, caps, png)
        self.queue.add(job)
        self.executor.wake()
        position, _ = self.queue.position(job.id) or (0, 0.0)
        return Admission(job, position)

    def resident_models(self) -> frozenset[str]:  # on any worker, for /models
        return self.executor.lanes.resident_models()

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

    async def ban(
        self, guild_id: int, member_id: int, moderator_id: int, reason: str | None
    ) -> list[Job]:
        """Ban a member from a server; their queued jobs there are cancelled and refunded
        (returned, for their statuses to be ended)."""
        cancelled = await self.store.write(
            moderation.ban, guild_id, member_id, moderator_id, reason
        )
        self._forget_queued(cancelled)
        return cancelled

    async def clear_queue(self, guild_id: int, member_id: int | None = None) -> list[Job]:
        """Cancel and refund a server's queued jobs, one member's or everyone's."""
        cancelled = await self.store.write(jobs.cancel_queued, guild_id, member_id)
        self._forget_queued(cancelled)
        return cancelled

    def _forget_queued(self, cancelled: list[Job]) -> None:
        for job in cancelled:
            self.queue.remove(job.id)

    async def forget_member(self, member_id: int) -> int:
        """Delete a member's prompts and parameters, from the write-ahead log too; raises
        members.JobStillRunning while one of their jobs runs. Returns the jobs deleted."""
        deleted = await self.store.write(members.forget, member_id)
        self._forget_queued(self.queue.jobs_of(member_id))
        await self.store.checkpoint()
        return deleted

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
