"""Prompts as members type them in /imagine and in replies: flags and permutations parsed
(bot/prompts.py) into one checked request per job, each admitted through the desk like any
other job, and the dry run's account of what was parsed."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import discord

from bot.prompts import ParsedPrompt, parse_prompt, parse_weights, weighted_terms
from bot.requests import GenerationRequest, InvalidRequest, Job, RawOptions
from bot.service import ImagineService, PreparedImage, prompt_chunks
from cogs.common import refusal_text, refuse

if TYPE_CHECKING:
    from cogs.admission import AdmissionDesk, Origin


async def parsed_or_refuse(
    origin: Origin, service: ImagineService, text: str
) -> ParsedPrompt | None:
    """The member's text parsed, or None after telling them privately what to fix."""
    try:
        return parse_prompt(text, service.settings.max_permutations)
    except InvalidRequest as problem:
        await refuse(origin, refusal_text(problem))
        return None


async def checked_jobs(
    desk: AdmissionDesk,
    origin: Origin,
    parsed: ParsedPrompt,
    raw: RawOptions,
    image: PreparedImage | None = None,
    *,
    override: bool = False,
    prompts: list[str] | None = None,
) -> tuple[list[GenerationRequest], bool] | None:
    """Every job's request checked (see `ParsedPrompt.requests` and `AdmissionDesk.checked`),
    and whether results are private; None after refusing the first problem, so nothing is
    admitted unless every job can be. `--no` adds to the member's default negative prompt
    when the request gives none."""
    if raw.negative_prompt is None and parsed.flags.negative:
        member = origin.user if isinstance(origin, discord.Interaction) else origin.author
        filled, _ = await desk.service.with_member_defaults(RawOptions(prompt=""), member.id)
        raw = replace(raw, negative_prompt=filled.negative_prompt)
    try:
        raws = parsed.requests(
            raw, desk.service.settings.limits, override=override, prompts=prompts
        )
    except InvalidRequest as problem:
        await refuse(origin, refusal_text(problem))
        return None
    requests: list[GenerationRequest] = []
    private = False
    for one in raws:
        checked = await desk.checked(origin, one, image)
        if checked is None:
            return None
        requests.append(checked[0])
        private = checked[1]
    return requests, private


async def admit_jobs(
    desk: AdmissionDesk,
    origin: Origin,
    requests: list[GenerationRequest],
    *,
    private: bool = False,
    arrived: float | None = None,
    parent: tuple[int, int] | None = None,
    init_image: PreparedImage | None = None,
) -> list[Job]:
    """Admit each job in turn, each charged and answered on its own (a follow-up after the
    first, for an interaction); stops at the first refusal, which the member is told."""
    admitted: list[Job] = []
    for request in requests:
        job = await desk.admit(
            origin,
            request,
            private=private,
            arrived=arrived,
            parent=parent,
            init_image=init_image,
            followup=bool(admitted),
        )
        if job is None:
            break
        admitted.append(job)
    return admitted


def dry_run_lines(
    service: ImagineService, parsed: ParsedPrompt | None, requests: list[GenerationRequest]
) -> list[str]:
    """The parsed prompt for the dry run: flags, weights, chunks and the jobs it makes."""
    lines = []
    if parsed is not None and parsed.flags.shown():
        lines.append("Flags: " + " ".join(f"`{flag[:60]}`" for flag in parsed.flags.shown()))
    first = requests[0]
    terms = weighted_terms(parse_weights(first.prompt))
    if terms:
        lines.append("Weights: " + ", ".join(terms[:10]) + (" …" if len(terms) > 10 else ""))
    if len(requests) > 1:
        lines.append(f"{len(requests)} jobs, each queued and charged on its own:")
    limit = service.settings.max_prompt_chunks
    for number, request in enumerate(requests, start=1):
        chunks, negative = prompt_chunks(service.runner, request, limit)
        label = f"{number}. " if len(requests) > 1 else "Prompt: "
        lines.append(
            f"{label}{request.prompt[:200]} · {chunks} of {limit} chunks"
            + (f" (negative {negative})" if request.negative_prompt else "")
            + f" · seed {request.seed}"
        )
    if first.negative_prompt:
        lines.append(f"Negative prompt: {first.negative_prompt[:200]}")
    return lines
