"""Variations: the Vary and Reroll buttons under results, replying to an image (or with one)
while mentioning the bot, and the "Vary" message context menu. All of them end in
ImagineCog.admit, so quotas, refusals and the status message are the same as for /imagine."""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.images import ImageRejected, read_parameters
from bot.requests import (
    SCHEDULERS,
    GenerationRequest,
    InvalidRequest,
    RawOptions,
    split_inline_options,
)
from bot.service import ImagineService, PreparedImage
from cogs.common import refusal_text, refuse

if TYPE_CHECKING:
    from cogs.imagine import ImagineCog

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REUSE_PROMPT = ".."


class VaryButton(
    discord.ui.DynamicItem[discord.ui.Button],
    template=r"vary:(?P<job>\d+):(?P<index>\d+):(?P<kind>subtle|strong)",
):
    """Vary one image of a result; job id and image index live in the custom_id, so the
    button works after a restart."""

    def __init__(self, job_id: int, index: int, kind: str) -> None:
        label = f"{'Subtle' if kind == 'subtle' else 'Strong'} #{index + 1}"
        super().__init__(
            discord.ui.Button(
                label=label,
                emoji="🪄" if kind == "subtle" else "🌀",
                style=discord.ButtonStyle.secondary,
                custom_id=f"vary:{job_id}:{index}:{kind}",
                row=min(index, 3),
            )
        )
        self.job_id, self.index, self.kind = job_id, index, kind

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]
    ) -> VaryButton:
        return cls(int(match["job"]), int(match["index"]), match["kind"])

    async def callback(self, interaction: discord.Interaction) -> None:
        cog: VariationsCog = interaction.client.get_cog("VariationsCog")
        await cog.vary_result(interaction, self.job_id, self.index, self.kind)


class RerollButton(discord.ui.DynamicItem[discord.ui.Button], template=r"reroll:(?P<job>\d+)"):
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

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]
    ) -> RerollButton:
        return cls(int(match["job"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        cog: VariationsCog = interaction.client.get_cog("VariationsCog")
        await cog.reroll(interaction, self.job_id)


def result_view(job_id: int, indexes: list[int]) -> discord.ui.View | None:
    """Vary (Subtle) and Vary (Strong) for each delivered image, and one Reroll."""
    if not indexes:
        return None
    view = discord.ui.View(timeout=None)
    for index in indexes:
        view.add_item(VaryButton(job_id, index, "subtle"))
        view.add_item(VaryButton(job_id, index, "strong"))
    view.add_item(RerollButton(job_id))
    return view


def image_attachment(
    message: discord.Message, name: str | None = None
) -> discord.Attachment | None:
    """The attachment called `name`, else the first one that looks like an image (its bytes
    are checked later: a name or a content type proves nothing)."""
    for attachment in message.attachments:
        if name is not None:
            if attachment.filename == name:
                return attachment
            continue
        content_type = attachment.content_type or ""
        if content_type.startswith("image/") or attachment.filename.lower().endswith(
            IMAGE_SUFFIXES
        ):
            return attachment
    return None


def raw_from_parameters(parameters: dict) -> RawOptions:
    """Options read from a PNG's A1111 `parameters`; a sampler we do not have is dropped."""
    sampler = parameters.get("sampler")
    return RawOptions(
        prompt=parameters.get("prompt"),
        negative_prompt=parameters.get("negative_prompt"),
        steps=parameters.get("steps"),
        guidance=parameters.get("cfg_scale"),
        scheduler=sampler if sampler in SCHEDULERS else None,
    )


def raw_from_request(request: GenerationRequest) -> RawOptions:
    return RawOptions(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=request.steps,
        guidance=request.guidance,
        scheduler=request.scheduler,
    )


class VariationsCog(commands.Cog):
    def __init__(self, bot: commands.Bot, service: ImagineService) -> None:
        self.bot = bot
        self.service = service
        self.vary_menu = app_commands.ContextMenu(name="Vary", callback=self.vary_message)

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.vary_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.vary_menu.name, type=self.vary_menu.type)

    @property
    def imagine(self) -> ImagineCog:
        return self.bot.get_cog("ImagineCog")

    # --- the shared path ------------------------------------------------------------------

    async def queue_variation(
        self,
        origin: discord.Interaction | discord.Message,
        image: PreparedImage,
        raw: RawOptions,
        *,
        parent: tuple[int, int] | None = None,
    ) -> None:
        member = origin.user if isinstance(origin, discord.Interaction) else origin.author
        raw, defaults = await self.service.with_member_defaults(raw, member.id)
        try:
            request = self.service.validate(raw, image)
        except InvalidRequest as problem:
            await refuse(origin, refusal_text(problem))
            return
        private = defaults.private and isinstance(origin, discord.Interaction)
        await self.imagine.admit(origin, request, private=private, parent=parent, init_image=image)

    def strength_for(self, kind: str) -> float:
        settings = self.service.settings
        return settings.vary_subtle if kind == "subtle" else settings.vary_strong

    # --- buttons --------------------------------------------------------------------------

    async def vary_result(
        self, interaction: discord.Interaction, job_id: int, index: int, kind: str
    ) -> None:
        record = await self.service.store.job(job_id)
        if record is None or index >= record.job.request.count:
            await refuse(interaction, "That image's job is gone (its owner deleted their data).")
            return
        seed = record.job.request.seeds[index]
        attachment = image_attachment(interaction.message, f"seed-{seed}.png")
        if attachment is None:
            await refuse(interaction, "That image is no longer attached to the message.")
            return
        image = await self.imagine.read_image(interaction, attachment)
        if image is None:
            return
        raw = raw_from_request(record.job.request)
        raw.strength = self.strength_for(kind)
        await self.queue_variation(interaction, image, raw, parent=(job_id, index))

    async def reroll(self, interaction: discord.Interaction, job_id: int) -> None:
        record = await self.service.store.job(job_id)
        if record is None:
            await refuse(interaction, "That job is gone (its owner deleted their data).")
            return
        request = record.job.request
        raw = raw_from_request(request)
        raw.count, raw.width, raw.height = request.count, request.width, request.height
        image = None
        if request.init_image_hash is not None:
            png = await self.service.store.init_image(request.init_image_hash)
            if png is None:
                await refuse(interaction, "The image this job started from is gone.")
                return
            image = PreparedImage(png, request.init_image_hash, request.width, request.height)
            raw.strength = request.strength
        if image is None:
            try:
                new = self.service.validate(raw)
            except InvalidRequest as problem:
                await refuse(interaction, refusal_text(problem))
                return
            await self.imagine.admit(interaction, new, parent=(job_id, 0))
        else:
            await self.queue_variation(interaction, image, raw, parent=(job_id, 0))

    # --- the context menu -----------------------------------------------------------------

    async def vary_message(
        self, interaction: discord.Interaction, message: discord.Message
    ) -> None:
        """Vary the first image of any message. The prompt comes from our own job for that
        message, else from the PNG's parameters, else from the message's text."""
        attachment = image_attachment(message)
        if attachment is None:
            await refuse(interaction, "That message has no image to vary.")
            return
        image = await self.imagine.read_image(interaction, attachment)
        if image is None:
            return
        raw, parent = await self.known_parameters(message, attachment)
        if raw is None:
            if not message.content.strip():
                await refuse(
                    interaction,
                    "I can't tell what that image shows. Reply to it, mention me and write a "
                    "prompt, or use /imagine with the image option.",
                )
                return
            raw = RawOptions(prompt=message.content)
        raw.strength = self.strength_for("subtle")
        await self.queue_variation(interaction, image, raw, parent=parent)

    async def known_parameters(
        self, message: discord.Message, attachment: discord.Attachment
    ) -> tuple[RawOptions | None, tuple[int, int] | None]:
        """Parameters to reuse for an image: our job's (and the lineage), or the PNG's own."""
        record = await self.service.store.job_for_message(message.id)
        if record is not None:
            request = record.job.request
            index = next(
                (i for i, s in enumerate(request.seeds) if attachment.filename == f"seed-{s}.png"),
                0,
            )
            return raw_from_request(request), (record.job.id, index)
        if attachment.size <= self.service.settings.max_upload_bytes:
            try:
                parameters = read_parameters(await attachment.read())
            except (ImageRejected, discord.HTTPException, OSError, ValueError):
                parameters = None
            if parameters and parameters.get("prompt"):
                return raw_from_parameters(parameters), None
        return None, None

    # --- replies --------------------------------------------------------------------------

    @commands.Cog.listener()
    async def on_message(self, message: discord.Message) -> None:
        """A member mentions the bot in a message with an image, or replies to an image
        (mentioning the bot, or at all when the message-content intent is on): the text is
        the new prompt, `..` or nothing reuses the old one; `--strength 0.5 --seed 7` work."""
        if message.author.bot or self.bot.user is None:
            return
        mentioned = self.bot.user in message.mentions
        if not (mentioned or self.service.settings.message_content):
            return
        source, attachment = message, image_attachment(message)
        if attachment is None and message.reference and message.reference.message_id:
            source = message.reference.resolved
            if not isinstance(source, discord.Message):
                try:
                    source = await message.channel.fetch_message(message.reference.message_id)
                except discord.HTTPException:
                    return
            attachment = image_attachment(source)
        if attachment is None or (source is message and not mentioned):
            return
        await self.vary_reply(message, source, attachment)

    async def vary_reply(
        self, message: discord.Message, source: discord.Message, attachment: discord.Attachment
    ) -> None:
        text = re.sub(rf"<@!?{self.bot.user.id}>", "", message.content).strip()
        try:
            prompt, options = split_inline_options(text)
        except InvalidRequest as problem:
            await refuse(message, refusal_text(problem))
            return
        image = await self.imagine.read_image(message, attachment)
        if image is None:
            return
        known, parent = (None, None)
        if source is not message:
            known, parent = await self.known_parameters(source, attachment)
        if prompt in ("", REUSE_PROMPT):
            if known is None:
                await refuse(message, "Tell me what to draw: write a prompt with your mention.")
                return
            raw = known
        else:
            raw = known or RawOptions(prompt=prompt)
            raw.prompt = prompt
        raw.strength = options.get("strength", self.strength_for("strong"))
        raw.seed = options.get("seed")  # None: a new random seed
        raw.steps = options.get("steps", raw.steps)
        raw.guidance = options.get("guidance", raw.guidance)
        await self.queue_variation(message, image, raw, parent=parent)


async def setup(bot: commands.Bot) -> None:
    bot.add_dynamic_items(VaryButton, RerollButton)
    await bot.add_cog(VariationsCog(bot, bot.service))
