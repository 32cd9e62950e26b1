"""The persistent buttons (a DynamicItem: its custom_id carries what it acts on, so it works
after a restart) and the views built from them, and the dry run's Confirm view; the tools
under a result (Upscale, Zoom Out, Pan) and its layout are in cogs/operations.py.

discord.py only logs an exception raised in a button's callback; here each one goes to the
same funnel as a slash command's (`answer_failure`), so the member always gets an answer."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Self

import discord

from bot.db import jobs
from bot.requests import GenerationRequest
from bot.uploads import PreparedImage
from cogs.common import Refused, answer_failure, answering, refuse
from cogs.entry import Ask
from cogs.sources import image_attachment, raw_from_request

if TYPE_CHECKING:
    from bot.app import ImagineBot


# A custom_id is whatever a client sends: its numbers are ASCII digits (`\d` and `isdigit()`
# also take "٣" and "²") within SQLite's INTEGER range.
MAX_ID_DIGITS = 19
MAX_ID = 2**63 - 1
ANY_VALUE = "[^:]*"  # matched loosely, so a malformed id still reaches us and gets an answer
NOT_OURS = "That button is not one I made; nothing was done."


def id_number(text: str) -> int | None:
    """The number a custom_id field spells, or None when it is not one we could have made."""
    if not (0 < len(text) <= MAX_ID_DIGITS and text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value <= MAX_ID else None


class Persistent:
    """Mixed into our DynamicItems: the custom_id's named groups rebuild the button (numbers
    as ints; a field that is not a number we could have made marks the button `malformed`),
    `run` does the work, and a failure in it reaches the error funnel."""

    WORDS: ClassVar[dict[str, tuple[str, ...]]] = {}  # fields that are words, and those allowed
    malformed = False

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item, match: re.Match[str]
    ) -> Self:
        fields: dict[str, Any] = {}
        malformed = False
        for name, text in match.groupdict().items():
            allowed = cls.WORDS.get(name)
            value = id_number(text) if allowed is None else text if text in allowed else None
            malformed |= value is None
            fields[name] = (0 if allowed is None else allowed[0]) if value is None else value
        button = cls(**fields)
        button.malformed = malformed
        return button

    # Each button's own work, defined by the button class.
    run: Callable[[discord.Interaction[ImagineBot]], Awaitable[None]]

    async def callback(self, interaction: discord.Interaction[ImagineBot]) -> None:
        async with answering(interaction):
            if self.malformed:
                raise Refused(NOT_OURS)
            await self.run(interaction)


async def answer_stray_click(interaction: discord.Interaction[ImagineBot]) -> None:
    """discord.py drops a click whose custom_id is not on the clicked message (a client can
    send any), or that no button of ours matches (an old message's, or a planted one): answer
    it, so no click is left unanswered. Live views (Confirm) sit on ephemeral panels only."""
    if interaction.type is not discord.InteractionType.component:
        return
    custom_id = (interaction.data or {}).get("custom_id")
    message = interaction.message
    rows = message.components if message is not None else []
    on_message = custom_id in [getattr(c, "custom_id", None) for row in rows for c in row.children]
    ours = any(
        item.__discord_ui_compiled_template__.fullmatch(str(custom_id))
        for item in interaction.client.dynamic_buttons
    )
    in_a_live_view = message is not None and message.flags.ephemeral
    if not on_message or not (ours or in_a_live_view):
        await refuse(interaction, NOT_OURS)


async def job_of(interaction: discord.Interaction[ImagineBot], job_id: int) -> jobs.JobRecord:
    """The job a result button acts on; Refused when it is gone."""
    record = await interaction.client.store.read(jobs.get, job_id)
    if record is None:
        raise Refused("That job is gone (its owner deleted their data).")
    return record


async def parent_image(
    interaction: discord.Interaction[ImagineBot], job_id: int, index: int
) -> tuple[jobs.JobRecord, discord.Attachment]:
    """The job of a result button and the file of its image `index` on the pressed message;
    Refused when either is gone."""
    record = await job_of(interaction, job_id)
    if index >= record.job.request.count:
        raise Refused("That image's job is gone (its owner deleted their data).")
    seed = record.job.request.seeds[index]
    attachment = image_attachment(interaction.message, f"seed-{seed}.png")
    if attachment is None:
        raise Refused("That image is no longer attached to the message.")
    return record, attachment


class CancelButton(
    Persistent,
    discord.ui.DynamicItem[discord.ui.Button],
    template=rf"cancel:(?P<job_id>{ANY_VALUE})",
):
    """Cancel on a status message, for the member who asked or a moderator."""

    def __init__(self, job_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Cancel", style=discord.ButtonStyle.secondary, custom_id=f"cancel:{job_id}"
            )
        )
        self.job_id = job_id

    async def run(self, interaction: discord.Interaction[ImagineBot]) -> None:
        """Cancel for its owner or a moderator of the job's server: at once if queued,
        between steps if running."""
        bot = interaction.client
        record = await bot.store.read(jobs.get, self.job_id)
        if record is None:
            await interaction.response.send_message("That job no longer exists.", ephemeral=True)
            return
        owner = record.job.member_id == interaction.user.id
        # A moderator of the job's own server: Manage Server elsewhere grants nothing here.
        moderator = (
            interaction.guild_id is not None
            and interaction.guild_id == record.job.guild_id
            and interaction.permissions.manage_guild
        )
        if not (owner or moderator):
            await interaction.response.send_message(
                "Only the member who asked (or a moderator) can cancel this job.", ephemeral=True
            )
            return
        outcome = await bot.service.cancel(self.job_id)
        if outcome is jobs.CancelOutcome.CANCELLED:
            bot.status_board.forget(self.job_id)
            await interaction.response.edit_message(
                content=f"Job #{self.job_id} was cancelled; its images were refunded.",
                view=None,
                attachments=[],
            )
        elif outcome is jobs.CancelOutcome.STOPPING:
            await interaction.response.send_message(
                f"Job #{self.job_id} is running; its images will be dropped and refunded.",
                ephemeral=True,
            )
        else:
            await interaction.response.send_message(
                f"Job #{self.job_id} has already finished.", ephemeral=True
            )


class VaryButton(
    Persistent,
    discord.ui.DynamicItem[discord.ui.Button],
    template=rf"vary:(?P<job_id>{ANY_VALUE}):(?P<index>{ANY_VALUE}):(?P<kind>{ANY_VALUE})",
):
    """Vary one image of a result, starting from the image attached to the message."""

    WORDS: ClassVar[dict[str, tuple[str, ...]]] = {"kind": ("subtle", "strong")}

    def __init__(self, job_id: int, index: int, kind: str) -> None:
        super().__init__(
            discord.ui.Button(
                label=f"{'Subtle' if kind == 'subtle' else 'Strong'} #{index + 1}",
                emoji="🪄" if kind == "subtle" else "🌀",
                style=discord.ButtonStyle.secondary,
                custom_id=f"vary:{job_id}:{index}:{kind}",
                row=min(index, 3),
            )
        )
        self.job_id, self.index, self.kind = job_id, index, kind

    async def run(self, interaction: discord.Interaction[ImagineBot]) -> None:
        desk = interaction.client.desk
        record, attachment = await parent_image(interaction, self.job_id, self.index)
        entry = await desk.entry(interaction, record.job, self.index)
        options = raw_from_request(record.job.request, interaction.client.service.catalog)
        await desk.admit(entry, Ask(options, image=attachment, strength=desk.strength(self.kind)))


class RerollButton(
    Persistent,
    discord.ui.DynamicItem[discord.ui.Button],
    template=rf"reroll:(?P<job_id>{ANY_VALUE})",
):
    """Run a result's request again with a new seed."""

    def __init__(self, job_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Reroll",
                emoji="🎲",
                style=discord.ButtonStyle.primary,
                custom_id=f"reroll:{job_id}",
                row=4,
            )
        )
        self.job_id = job_id

    async def run(self, interaction: discord.Interaction[ImagineBot]) -> None:
        bot = interaction.client
        record = await job_of(interaction, self.job_id)
        request = record.job.request
        if request.init_image_hash is not None and record.job.member_id != interaction.user.id:
            # Its image may be the owner's upload, never shown to anyone else.
            raise Refused("Only the member who asked can reroll a job that started from an image.")
        entry = await bot.desk.entry(interaction, record.job)
        await bot.desk.admit(entry, await reroll_ask(bot, request))


async def reroll_ask(bot: ImagineBot, request: GenerationRequest) -> Ask:
    """`request` again with a new seed, as the job asked it, without the member's current
    /settings. One that started from an image (image-to-image, Upscale, Zoom Out, Pan) starts
    from the same stored picture and keeps its mode, model, LoRAs, kept box and name."""
    options = raw_from_request(request, bot.service.catalog)
    options.count, options.width, options.height = request.count, request.width, request.height
    if request.init_image_hash is None:
        return Ask(options, own_defaults=False)
    png = await bot.store.read(jobs.init_image, request.init_image_hash)
    if png is None:
        raise Refused("The image this job started from is gone.")
    image = PreparedImage(png, request.init_image_hash, request.width, request.height)
    options.strength = 1.0 if request.strength is None else request.strength
    if options.model != request.model:  # checked as the model its fill-only model paints for,
        options.loras = None  # without the LoRAs chosen for the fill-only one (kept below)

    def as_before(checked: GenerationRequest) -> GenerationRequest:
        return replace(
            checked,
            mode=request.mode,
            strength=request.strength,
            keep_box=request.keep_box,
            operation=request.operation,
            model=request.model,
            loras=request.loras,
        )

    return Ask(options, image=image, own_defaults=False, derive=as_before)


class ForgetMeButton(
    Persistent,
    discord.ui.DynamicItem[discord.ui.Button],
    template=rf"forget-me:(?P<member_id>{ANY_VALUE})",
):
    """The /forget-me confirmation; its custom_id names the member, so nobody else can press
    it for them."""

    def __init__(self, member_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Delete my prompts",
                style=discord.ButtonStyle.danger,
                custom_id=f"forget-me:{member_id}",
            )
        )
        self.member_id = member_id

    async def run(self, interaction: discord.Interaction[ImagineBot]) -> None:
        """Delete the member's prompts, then end the statuses of their queued jobs."""
        if interaction.user.id != self.member_id:
            raise Refused("This button belongs to someone else.")
        deleted = await interaction.client.service.forget_member(self.member_id)
        await interaction.response.edit_message(
            content=f"Done: deleted {deleted} job(s) with their prompts and parameters. "
            "Your quota counts are kept, without any text.",
            view=None,
        )
        # Their queued jobs went with their data: end those statuses.
        await interaction.client.delivery.withdraw_member(
            self.member_id, "Job #{job} was cancelled: you deleted your data. It was refunded."
        )


PERSISTENT_BUTTONS = (CancelButton, VaryButton, RerollButton, ForgetMeButton)


def persistent_view(*items: discord.ui.Item) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for item in items:
        view.add_item(item)
    return view


def cancel_view(job_id: int) -> discord.ui.View:
    return persistent_view(CancelButton(job_id))


def forget_me_view(member_id: int) -> discord.ui.View:
    return persistent_view(ForgetMeButton(member_id))


class ConfirmView(discord.ui.View):
    """The dry run's Confirm button: admits the shown requests (one per job of a prompt's
    permutations) once, then leaves the panel. It lives in memory (a dry run is a moment's
    decision): ten minutes, or until a restart."""

    def __init__(
        self,
        requests: list[GenerationRequest],
        panel: discord.Interaction,
        *,
        image: PreparedImage | None,
    ) -> None:
        super().__init__(timeout=600)
        self.requests = requests
        self.panel = panel
        self.image = image
        self.used = False

    @discord.ui.button(label="Confirm", style=discord.ButtonStyle.primary)
    async def confirm(
        self, interaction: discord.Interaction[ImagineBot], button: discord.ui.Button
    ) -> None:
        if self.used:  # a double click racing the panel's update
            raise Refused("Already confirmed.")
        self.used = True
        self.stop()
        desk, admitted = interaction.client.desk, []
        try:
            entry = await desk.entry(interaction)
            admitted = await desk.admit(entry, Ask(requests=self.requests, image=self.image))
        finally:  # the panel says what became of it, whatever the funnel answers
            numbers = ", ".join(f"#{job.id}" for job in admitted)
            text = f"Confirmed as job {numbers}." if admitted else "Not queued: see below."
            with contextlib.suppress(discord.HTTPException):
                await self.panel.edit_original_response(content=text, view=None)

    async def on_error(
        self, interaction: discord.Interaction[ImagineBot], error: Exception, item: discord.ui.Item
    ) -> None:
        await answer_failure(interaction, error)
