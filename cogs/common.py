"""Small helpers every cog uses to answer members the same way, and the one error funnel."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import discord
from discord import app_commands

from bot.db.members import JobStillRunning
from bot.images import ImageRejected
from bot.operations import OperationRefused
from bot.quota import (
    AdmissionRefused,
    CostOverCap,
    MemberBanned,
    PromptBlocked,
    QuotaExceeded,
    QuotaStatus,
    QuotaUsedUp,
    ShuttingDown,
    TooManyQueued,
    cost_text,
    units_phrase,
    units_text,
)
from bot.requests import InvalidRequest
from bot.service import DefaultsRefused

log = logging.getLogger(__name__)

APOLOGY = "Something went wrong on our side; nothing was charged. Please try again."
# Discord refuses content over 2,000 characters; a refusal never comes near it.
MAX_ANSWER = 1900
ONLY_IN_SERVERS = "I make images only in servers, where their rules and quotas apply."
NOTHING_CHARGED = "Nothing was queued or charged."


Origin = discord.Interaction | discord.Message


class Refused(Exception):
    """A request turned away by the Discord side (no image to vary, a job that is gone): the
    funnel tells the member this text, privately."""


# What a member did wrong, answered with its own text; anything else is our fault.
REFUSALS = (
    Refused,
    InvalidRequest,
    AdmissionRefused,
    ImageRejected,
    OperationRefused,
    DefaultsRefused,
    JobStillRunning,
)


class AdmittedButUnanswered(Exception):
    """The job is queued (and charged), but telling the member so failed."""

    def __init__(self, job_id: int) -> None:
        super().__init__(f"job {job_id} was admitted but its status could not be sent")
        self.job_id = job_id


def bounded(text: str) -> str:
    return text if len(text) <= MAX_ANSWER else text[: MAX_ANSWER - 1] + "…"


async def refuse(origin: Origin, text: str) -> None:
    """Tell a member why nothing was queued: privately for an interaction, as a reply to a
    message (which cannot be private). It may quote their text, so it pings nobody."""
    text, quiet = bounded(text), discord.AllowedMentions.none()
    if isinstance(origin, discord.Message):
        await origin.reply(text, mention_author=False, allowed_mentions=quiet)
    elif origin.response.is_done():
        await origin.followup.send(text, ephemeral=True, allowed_mentions=quiet)
    else:
        await origin.response.send_message(text, ephemeral=True, allowed_mentions=quiet)


def in_a_server(interaction: discord.Interaction) -> bool:
    """An app-command check: Discord hides guild-only commands in DMs, but a client can still
    send one, and a DM has no server whose bans, blocklist and quotas apply."""
    if interaction.guild_id is None:
        raise app_commands.NoPrivateMessage(ONLY_IN_SERVERS)
    return True


server_only = app_commands.check(in_a_server)


async def answer_failure(origin: Origin, error: Exception) -> None:
    """The one error funnel for slash commands, context menus, buttons, modals and replies: a
    refusal gets its own text, anything else a short apology, never a traceback (logged with
    its own). Privately for an interaction; a reply gets a reply that pings nobody."""
    cause = getattr(error, "original", error)  # app commands wrap it in CommandInvokeError
    if isinstance(error, app_commands.MissingPermissions):
        text = "You need the Manage Server permission for this command."
    elif isinstance(error, app_commands.NoPrivateMessage):
        text = ONLY_IN_SERVERS
    elif isinstance(cause, REFUSALS):
        text = refusal_text(cause)
    elif isinstance(cause, AdmittedButUnanswered):
        log.error("%s failed after admission", _what(origin), exc_info=error)
        text = (
            f"Your job #{cause.job_id} is queued, but its status message failed; the result "
            "will still be posted (a job that fails is refunded)."
        )
    else:
        log.error("%s failed", _what(origin), exc_info=error)
        text = APOLOGY
    try:
        await refuse(origin, text)
    except discord.HTTPException:
        log.warning("could not tell the member about the error")


@contextlib.asynccontextmanager
async def answering(origin: Origin) -> AsyncIterator[None]:
    """Run an entry point's work so that whatever it raises reaches the funnel: for buttons
    and replies, whose errors discord.py would only log."""
    try:
        yield
    except Exception as error:
        await answer_failure(origin, error)


def _what(origin: Origin) -> str:
    if isinstance(origin, discord.Message):
        return f"reply {origin.id}"
    if origin.command is not None:
        return f"command {origin.command.qualified_name!r}"
    data: Any = origin.data or {}
    return f"component {data.get('custom_id', '?')!r}"


def loras_text(loras: tuple[tuple[str, float], ...]) -> str:
    """LoRAs as members type them in `lora:`: "pixel-art:0.8 other:1"."""
    return " ".join(f"{name}:{weight:g}" for name, weight in loras)


def role_ids(user: discord.abc.User) -> list[int]:
    return [role.id for role in getattr(user, "roles", [])]


def relative_time(timestamp: float) -> str:
    """Discord renders this as "in 3 hours" in each reader's own language and time zone."""
    return f"<t:{int(timestamp)}:R>"


def standing_text(status: QuotaStatus) -> str:
    """What a member used: "12.5 of your 100 units in the last 24 hours"."""
    if status.unlimited:
        return f"{units_phrase(status.used)} in the last 24 hours, with no limit"
    return f"{units_text(status.used)} of your {units_phrase(status.limit)} in the last 24 hours"


def frees_up_text(status: QuotaStatus) -> str:
    """When the oldest charge in the window leaves it (and gives its units back), if ever."""
    if status.unlimited or status.next_free_at is None:
        return ""
    return f" Units free up again {relative_time(status.next_free_at)}."


def refusal_text(problem: Exception) -> str:
    """What a member reads when a request is turned away; nothing was queued or charged."""
    if isinstance(problem, Refused):
        return str(problem)
    if isinstance(problem, JobStillRunning):
        return "One of your jobs is running right now; try again when it has finished."
    if isinstance(problem, DefaultsRefused):
        return f"{problem} Your defaults were not changed."
    if isinstance(problem, InvalidRequest | ImageRejected | OperationRefused):
        return f"{problem} Nothing was queued."
    if isinstance(problem, QuotaExceeded):
        return (
            f"You have used {standing_text(problem.status)}; this request is "
            f"{cost_text(problem.request)}.{frees_up_text(problem.status)} {NOTHING_CHARGED}"
        )
    if isinstance(problem, QuotaUsedUp):
        return (
            f"You have used {standing_text(problem.status)}: none is left."
            f"{frees_up_text(problem.status)} {NOTHING_CHARGED}"
        )
    if isinstance(problem, TooManyQueued):
        jobs = f"{problem.active} job" + ("" if problem.active == 1 else "s")
        return (
            f"You have {jobs} queued or running; the limit is {problem.limit}: wait for one to "
            f"finish or cancel one. {NOTHING_CHARGED}"
        )
    if isinstance(problem, CostOverCap):
        return (
            f"This request is {cost_text(problem.request)}; one request may cost at most "
            f"{units_phrase(problem.cap)}. Ask for fewer or smaller images or fewer steps. "
            f"{NOTHING_CHARGED}"
        )
    if isinstance(problem, MemberBanned):
        reason = f" Reason: {problem.reason}" if problem.reason else ""
        return f"Sorry, you can't generate images on this server.{reason}"
    if isinstance(problem, ShuttingDown):
        return "The bot is restarting; please try again in a minute. Nothing was charged."
    if isinstance(problem, PromptBlocked):
        option = "negative prompt" if problem.option == "negative_prompt" else "prompt"
        return f"Your {option} contains a term this server blocks. {NOTHING_CHARGED}"
    raise TypeError(problem)
