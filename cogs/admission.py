"""The one way a Discord request enters the queue.

Every entry point (a slash command, a button, a modal, a reply, the context menu) builds its
`Entry` once (`AdmissionDesk.entry`: who asks, where, under whose rules) and an `Ask` (what it
asks for), and calls `AdmissionDesk.admit`. The desk reads the image, fills the member's
defaults, applies the prompt's flags and permutations, validates, admits and answers with the
status message. A refusal is raised, never answered here: it reaches the one funnel
(`cogs/common.answer_failure`), for commands, components, modals and replies alike."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import discord

from bot.db import jobs
from bot.images import ImageRejected
from bot.intake import Intake, quota_exempt, role_weight
from bot.prompts import ParsedPrompt, parse_prompt
from bot.quota import AdmissionRefused
from bot.requests import GenerationRequest, Job, RawOptions
from bot.service import ImagineService, saved_defaults
from bot.uploads import PreparedImage
from cogs.buttons import cancel_view
from cogs.common import (
    ONLY_IN_SERVERS,
    AdmittedButUnanswered,
    Origin,
    Refused,
    answer_failure,
    role_ids,
)
from cogs.entry import Ask, Entry, Prepared, guild_id_of, member_of
from cogs.models import age_restricted
from cogs.sources import SPOILER, raw_from_parameters, raw_from_request
from cogs.status import Status, StatusBoard, position_text

log = logging.getLogger(__name__)

UNKNOWN_IMAGE = (
    "I don't know what that image shows: reply to it mentioning me with a prompt, or use "
    "/imagine with the image option."
)


async def download(attachment: discord.Attachment) -> bytes:
    try:
        return await attachment.read()
    except discord.HTTPException as error:
        raise Refused("I could not download that image; please try again.") from error


def stand_in(attachment: discord.Attachment) -> PreparedImage:
    """A picture of the attachment's announced size (Discord's, else 512²), for checking the
    options before the real one is decoded: the sizes an upload is drawn at come from it."""
    sides = [attachment.width, attachment.height]
    width, height = (s if isinstance(s, int) and 0 < s <= 1 << 16 else 512 for s in sides)
    return PreparedImage(b"", "", width, height, upload_size=(width, height))


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

    def parse(self, text: str) -> ParsedPrompt:
        """A member's typed prompt: flags, permutations (InvalidRequest names the problem)."""
        return parse_prompt(text, self.service.settings.max_permutations)

    async def entry(self, origin: Origin, parent: Job | None = None, index: int = 0) -> Entry:
        """Who asks and where, read once per request. The server whose rules apply is where
        it was made, or, for a button on a result delivered by DM, its job's server; `parent`
        is the job whose image `index` a variation starts from. Nothing is admitted in a DM."""
        member = member_of(origin)
        guild = guild_id_of(origin) or (parent.guild_id if parent else None)
        if guild is None:
            raise Refused(ONLY_IN_SERVERS)
        defaults = await self.service.member_defaults(member.id)
        interaction = origin if isinstance(origin, discord.Interaction) else None
        roles = role_ids(member)
        intake = Intake(
            member.id,
            guild,
            origin.channel.id if origin.channel else None,
            interaction.id if interaction else None,
            parent=None if parent is None else (parent.id, index),
            weight=role_weight(self.service.settings, roles),
            exempt=quota_exempt(self.service.settings, roles),
            private=defaults.private and interaction is not None,  # only they answer privately
            age_restricted=age_restricted(origin.channel),
        )
        return Entry(origin, intake, defaults, time.monotonic())

    async def admit(self, entry: Entry, ask: Ask) -> list[Job]:
        """Admit every job `ask` makes, each charged and answered on its own (a follow-up after
        the first, for an interaction). A refusal of the first is raised; one after it stops
        there, and the member is told which were queued and why the rest were not."""
        prepared = await self.prepare(entry, ask)
        for request in prepared.requests:  # every job's texts first: `{xx,nu}de` queues neither
            await self.service.gate.check_request(prepared.entry.intake, request)
        admitted: list[Job] = []
        for request in prepared.requests:
            try:
                admitted.append(await self._admit_one(prepared, request, followup=bool(admitted)))
            except AdmissionRefused as problem:
                if not admitted:
                    raise
                await answer_failure(entry.origin, problem)
                break
        return admitted

    async def prepare(self, entry: Entry, ask: Ask) -> Prepared:
        """Everything before admission, with nothing stored or charged: the image read, the
        options resolved, one checked request per job. Raises the first problem found, so
        nothing is admitted unless every job can be."""
        if ask.requests is not None:
            image = ask.image if isinstance(ask.image, PreparedImage) else None
            return Prepared(entry, ask.requests, image, ask.parsed)
        if isinstance(ask.image, discord.Attachment):
            return await self._prepare_upload(entry, ask, ask.image)
        entry, options = await self._options(entry, ask, b"")
        raws = self._jobs(entry, ask, options)
        requests = [self._checked(entry, raw, ask.image, ask) for raw in raws]
        return Prepared(entry, requests, ask.image, ask.parsed)

    async def _prepare_upload(
        self, entry: Entry, ask: Ask, attachment: discord.Attachment
    ) -> Prepared:
        """`prepare` with an attachment to read. Whatever needs no pixels is refused before
        the file is downloaded and decoded: its announced size, the ban list and the prompt
        known so far, the options themselves (checked on a stand-in of the picture's announced
        size), then the member's queue limit and quota. One member reads one image at a
        time. An interaction is deferred first, privately: reading can outlast
        Discord's 3 seconds."""
        limit = self.service.settings.max_upload_bytes
        if attachment.size > limit:
            raise Refused(
                f"The image is {attachment.size / 2**20:.1f} MiB; the limit is "
                f"{limit / 2**20:g} MiB. Nothing was queued."
            )
        gate = self.service.gate
        await gate.check_member(entry.intake, {"prompt": ask.known_prompt() or ""})
        origin = entry.origin
        if isinstance(origin, discord.Interaction) and not origin.response.is_done():
            await origin.response.defer(ephemeral=True, thinking=True)
        async with gate.one_decode(entry.intake.member_id):
            # Only `like` needs the file for the options (its PNG may carry them).
            data = await download(attachment) if ask.like is not None else b""
            entry, options = await self._options(entry, ask, data)
            raws = self._jobs(entry, ask, options)
            for raw in raws:
                self._checked(entry, raw, stand_in(attachment), ask)
            await gate.check_room(entry.intake)
            data = data or await download(attachment)
            image = await (ask.prepare or self.service.prepare_init_image)(data)
        requests = [self._checked(entry, raw, image, ask) for raw in raws]
        return Prepared(entry, requests, image, ask.parsed)

    async def _options(self, entry: Entry, ask: Ask, data: bytes) -> tuple[Entry, RawOptions]:
        """The options before flags: those of `like`'s image when known (its job becomes the
        parent), else `ask.options`; with the asked strength."""
        options = ask.options
        if ask.like is not None and isinstance(ask.image, discord.Attachment):
            known = await self._parameters_of(ask.like, ask.image, data)
            if known is not None:
                options, parent = known
                if parent is not None:
                    entry = entry.varying(*parent)
        if options is None:
            raise Refused(UNKNOWN_IMAGE)
        strength = options.strength if ask.strength is None else ask.strength
        return entry, replace(options, strength=strength)

    async def _parameters_of(
        self, message: discord.Message, attachment: discord.Attachment, data: bytes
    ) -> tuple[RawOptions, tuple[int, int] | None] | None:
        """Parameters to reuse for an image: our job's (and which image of it), or those its
        PNG carries (A1111 format; unreadable ones are no parameters)."""
        catalog = self.service.catalog
        record = await self.service.store.read(jobs.for_message, message.id)
        if record is not None:
            request = record.job.request
            names = [f"seed-{seed}.png" for seed in request.seeds]
            name = attachment.filename.removeprefix(SPOILER)  # a flagged image, as a spoiler
            index = names.index(name) if name in names else 0
            return raw_from_request(request, catalog), (record.job.id, index)
        try:
            parameters = await self.service.image_parameters(data)
        except (ImageRejected, OSError, ValueError):
            return None
        if parameters and parameters.get("prompt"):
            return raw_from_parameters(parameters, catalog), None
        return None

    def _jobs(self, entry: Entry, ask: Ask, options: RawOptions) -> list[RawOptions]:
        """One set of options per job: the typed text's flags and permutations applied.
        `--no` adds to the member's default negative prompt when the options give none."""
        parsed = ask.parsed
        if parsed is None:
            return [options]
        if options.negative_prompt is None and parsed.flags.negative:
            own = saved_defaults(RawOptions(prompt=""), entry.defaults, self.service.catalog)
            options = replace(options, negative_prompt=own.negative_prompt)
        prompts = [options.prompt] * parsed.flags.repeat if ask.repeat_prompt else None
        limits = self.service.settings.limits
        return parsed.requests(options, limits, override=ask.override, prompts=prompts)

    def _checked(
        self, entry: Entry, raw: RawOptions, image: PreparedImage | None, ask: Ask
    ) -> GenerationRequest:
        """One job's options with the member's /settings filled in, validated and derived."""
        if ask.own_defaults:
            raw = saved_defaults(raw, entry.defaults, self.service.catalog)
        request = self.service.validate(raw, image)
        request = request if ask.derive is None else ask.derive(request)
        catalog = self.service.catalog  # an `nsfw` model, refused so a dry run says it too
        catalog.check_audience(request.model, entry.intake.age_restricted)
        return request

    async def _admit_one(
        self, prepared: Prepared, request: GenerationRequest, *, followup: bool
    ) -> Job:
        """Admit one checked request (one short SQLite transaction, well inside Discord's 3
        seconds), then answer with its status message. Answering after admission lets a
        refusal stay private."""
        entry, origin = prepared.entry, prepared.entry.origin
        admission = await self.service.submit(request, entry.intake, prepared.image)
        job = admission.job
        status = Status(
            job.id,
            job.member_id,
            origin if isinstance(origin, discord.Interaction) else None,
            entry.arrived,
            headline=f"Queued as job #{job.id}",
            detail=position_text(admission.position, None),
            private=entry.intake.private,
            reply_to=origin if isinstance(origin, discord.Message) else None,
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
