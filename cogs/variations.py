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
from bot.requests import InvalidRequest, RawOptions
from cogs.common import ONLY_IN_SERVERS, Refused, answering, server_only
from cogs.entry import Ask
from cogs.operations import operation_ask
from cogs.sources import image_attachment

if TYPE_CHECKING:
    from bot.app import ImagineBot

REUSE_PROMPT = ".."

# Reply flags that make an Upscale, Zoom Out or Pan of the image replied to, and their values.
OPERATION_FLAGS: dict[str, dict[str, str]] = {
    "upscale": {"subtle": "upscale-subtle", "creative": "upscale-creative"},
    "zoom": {"1.5": "zoom-1.5", "2": "zoom-2"},
    "pan": {side: f"pan-{side}" for side in ("left", "right", "up", "down")},
}
# `--upscale subtle`, as the prompt language writes flags (a phone's em dash too); the value
# is one word, cut short so a hostile one stays short in the refusal.
_OPERATION_FLAG = re.compile(r"(?:(?<=\s)|^)(?:--|—)(upscale|zoom|pan)\b[ \t]*(\S{0,20})", re.I)


def operation_flag(text: str) -> tuple[str | None, str]:
    """The operation a reply's `--upscale`, `--zoom` or `--pan` asks for (None without one)
    and the text left around it. InvalidRequest for a value not offered, or two of them."""
    found = list(_OPERATION_FLAG.finditer(text))
    if not found:
        return None, text
    if len(found) > 1:
        raise InvalidRequest(
            f"--{found[1][1].lower()}", "use one of --upscale, --zoom or --pan at a time."
        )
    flag, value = found[0][1].lower(), found[0][2].lower()
    choices = OPERATION_FLAGS[flag]
    if value not in choices:
        raise InvalidRequest(f"--{flag}", f"must be one of: {', '.join(choices)}; got {value!r}.")
    rest = (text[: found[0].start()] + text[found[0].end() :]).strip()
    return choices[value], rest


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
            raise Refused("That message has no image to vary.")
        entry = await self.desk.entry(interaction)
        text = RawOptions(prompt=message.content) if message.content.strip() else None
        strength = self.desk.strength("subtle")
        await self.desk.admit(entry, Ask(text, image=attachment, like=message, strength=strength))

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
        async with answering(message):
            if message.guild is None:  # a DM has no server whose bans, blocklist, quota apply
                raise Refused(ONLY_IN_SERVERS)
            await self.vary_reply(message, source, attachment)

    async def vary_reply(
        self, message: discord.Message, source: discord.Message, attachment: discord.Attachment
    ) -> None:
        """A variation of the image replied to (or attached), or with `--upscale`, `--zoom`
        or `--pan` that job of one of our results."""
        text = re.sub(rf"<@!?{self.bot.user.id}>", "", message.content).strip()
        operation, rest = operation_flag(text)
        if operation is not None:
            await self.operate_reply(message, source, operation, rest)
            return
        parsed = self.desk.parse(text)
        reuse = parsed.text in ("", REUSE_PROMPT)
        entry = await self.desk.entry(message)
        ask = Ask(
            None if reuse else RawOptions(prompt=parsed.text),
            parsed=parsed,
            override=True,  # the flags override what the earlier job asked; its seed is not reused
            repeat_prompt=reuse,
            image=attachment,
            like=None if source is message else source,
            strength=self.desk.strength("strong"),  # unless --strength says otherwise
        )
        await self.desk.admit(entry, ask)

    async def operate_reply(
        self, message: discord.Message, source: discord.Message, operation: str, rest: str
    ) -> None:
        """`--upscale`, `--zoom` or `--pan` in a reply to one of our results with one image:
        the same job as its button makes. It keeps the image's prompt, seed and model, so any
        other text or flag is refused rather than silently ignored."""
        if rest not in ("", REUSE_PROMPT):
            raise Refused(
                "`--upscale`, `--zoom` and `--pan` keep the image's prompt, seed and model: "
                "reply with the flag alone, like `--upscale subtle`. Nothing was queued."
            )
        record = None
        if source is not message:
            record = await self.bot.store.read(jobs.for_message, source.id)
        if record is None:
            raise Refused(
                "`--upscale`, `--zoom` and `--pan` work on my results: reply to one of them. "
                "Nothing was queued."
            )
        seeds = record.job.request.seeds
        found = [
            (index, attachment)
            for index, seed in enumerate(seeds)
            if (attachment := image_attachment(source, f"seed-{seed}.png")) is not None
        ]
        if len(found) != 1:
            raise Refused(
                "That message holds several images: press 🔎 under the one you want, or reply "
                "to a single image. Nothing was queued."
            )
        index, attachment = found[0]
        entry = await self.desk.entry(message, record.job, index)
        ask = operation_ask(self.bot, record.job.request, index, attachment, operation)
        await self.desk.admit(entry, ask)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(VariationsCog(bot))
