"""What an entry point hands the admission desk (cogs/admission.py): the `Entry` (who asks,
where, under whose rules), the `Ask` (what for), and what comes back before admission
(`Prepared`, for the dry run)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import discord

from bot.db.members import MemberDefaults
from bot.intake import Intake
from bot.prompts import ParsedPrompt
from bot.requests import GenerationRequest, RawOptions
from bot.uploads import PreparedImage
from cogs.common import Origin

Prepare = Callable[[bytes], Awaitable[PreparedImage]]


def member_of(origin: Origin) -> discord.User | discord.Member:
    return origin.user if isinstance(origin, discord.Interaction) else origin.author


def guild_id_of(origin: Origin) -> int | None:
    if isinstance(origin, discord.Interaction):
        return origin.guild_id
    return origin.guild.id if origin.guild else None


@dataclass(frozen=True)
class Entry:
    """A request as it came in: the interaction or message to answer, its `Intake`, the
    member's saved /settings (read once) and when it arrived (a token lives 15 minutes)."""

    origin: Origin
    intake: Intake
    defaults: MemberDefaults
    arrived: float

    def varying(self, job_id: int, index: int) -> Entry:
        return replace(self, intake=self.intake.varying(job_id, index))


@dataclass
class Ask:
    """What an entry point asks for; the desk does the rest.

    - `options` as typed, or derived from a parent job; with `like`, only the fallback.
    - `parsed`: the member's typed text, whose flags and permutations apply over `options`
      (`override`: the flags win, as in a reply; `repeat_prompt`: `..`, every job keeps the
      options' prompt).
    - `image` to start from: an attachment, read here and made into the start picture by
      `prepare` (else an upload's), or a picture already prepared.
    - `like`: a message whose image's parameters (our job's, else its PNG's) are the options.
    - `strength` over the options, before the flags; `own_defaults`: fill what the member left
      out from their /settings; `derive` turns each checked request into the job (Reroll,
      Upscale, Zoom Out, Pan); `requests` already checked (the dry run's Confirm)."""

    options: RawOptions | None = None
    parsed: ParsedPrompt | None = None
    override: bool = False
    repeat_prompt: bool = False
    image: discord.Attachment | PreparedImage | None = None
    prepare: Prepare | None = None
    like: discord.Message | None = None
    strength: float | None = None
    own_defaults: bool = True
    derive: Callable[[GenerationRequest], GenerationRequest] | None = None
    requests: list[GenerationRequest] | None = None

    def known_prompt(self) -> str | None:
        """The prompt known before the image is read, checked against the blocklist first."""
        if self.parsed is not None:
            return None if self.repeat_prompt else self.parsed.text
        return None if self.options is None or self.like else self.options.prompt


@dataclass(frozen=True)
class Prepared:
    """Checked requests, one per job, with their start picture and who asks (a `like` may
    have found the parent): what the dry run shows and Confirm admits."""

    entry: Entry
    requests: list[GenerationRequest]
    image: PreparedImage | None
    parsed: ParsedPrompt | None
