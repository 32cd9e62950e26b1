"""Variations outside the result buttons: replying to an image (or with one) while mentioning
the bot, and the "Vary" message context menu. Both end at the admission desk, so quotas,
refusals and the status message are the same as for /imagine."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.db import jobs
from bot.images import ImageRejected
from bot.requests import RawOptions
from cogs.common import ONLY_IN_SERVERS, refuse, server_only
from cogs.prompting import admit_jobs, checked_jobs, parsed_or_refuse
from cogs.sources import image_attachment, raw_from_parameters, raw_from_request

if TYPE_CHECKING:
    from bot.app import ImagineBot

REUSE_PROMPT = ".."


class VariationsCog(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot
        self.desk = bot.desk
        self.vary_menu = app_commands.ContextMenu(name="Vary", callback=self.vary_message)

    async def cog_load(self) -> None:
        self.bot.tree.add_command(self.vary_menu)

    async def cog_unload(self) -> None:
        self.bot.tree.remove_command(self.vary_menu.name, type=self.vary_menu.type)

    # --- the context menu -----------------------------------------------------------------

    @app_commands.guild_only()
    @server_only
    async def vary_message(
        self, interaction: discord.Interaction[ImagineBot], message: discord.Message
    ) -> None:
        """Vary the first image of any message. The prompt comes from our own job for that
        message, else from the PNG's parameters, else from the message's text."""
        attachment = image_attachment(message)
        if attachment is None:
            await refuse(interaction, "That message has no image to vary.")
            return
        image = await self.desk.read_image(interaction, attachment)
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
        raw.strength = self.desk.strength("subtle")
        await self.desk.queue(interaction, raw, image, parent=parent)

    async def known_parameters(
        self, message: discord.Message, attachment: discord.Attachment
    ) -> tuple[RawOptions | None, tuple[int, int] | None]:
        """Parameters to reuse for an image: our job's (and the lineage), or the PNG's own."""
        record = await self.bot.store.read(jobs.for_message, message.id)
        if record is not None:
            request = record.job.request
            index = next(
                (i for i, s in enumerate(request.seeds) if attachment.filename == f"seed-{s}.png"),
                0,
            )
            return raw_from_request(request), (record.job.id, index)
        if attachment.size <= self.bot.settings.max_upload_bytes:
            try:
                parameters = await self.bot.service.image_parameters(await attachment.read())
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
        if not (mentioned or self.bot.settings.message_content):
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
        if message.guild is None:  # a DM has no server whose bans, blocklist and quota apply
            await refuse(message, ONLY_IN_SERVERS)
            return
        await self.vary_reply(message, source, attachment)

    async def vary_reply(
        self, message: discord.Message, source: discord.Message, attachment: discord.Attachment
    ) -> None:
        text = re.sub(rf"<@!?{self.bot.user.id}>", "", message.content).strip()
        parsed = await parsed_or_refuse(message, self.bot.service, text)
        if parsed is None:
            return
        reuse = parsed.text in ("", REUSE_PROMPT)
        image = await self.desk.read_image(
            message, attachment, prompt=None if reuse else parsed.text
        )
        if image is None:
            return
        known, parent = (None, None)
        if source is not message:
            known, parent = await self.known_parameters(source, attachment)
        if reuse and known is None:
            await refuse(message, "Tell me what to draw: write a prompt with your mention.")
            return
        raw = known or RawOptions(prompt=parsed.text)
        raw.strength = self.desk.strength("strong")  # unless --strength says otherwise
        # The flags override what the earlier job asked; its seed is not reused.
        checked = await checked_jobs(
            self.desk,
            message,
            parsed,
            raw,
            image,
            override=True,
            prompts=[raw.prompt] * parsed.flags.repeat if reuse else None,
        )
        if checked is not None:
            await admit_jobs(self.desk, message, checked[0], parent=parent, init_image=image)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(VariationsCog(bot))
