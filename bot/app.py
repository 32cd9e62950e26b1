"""The Bot: owns the service's Discord side, loads the cogs, answers app-command errors."""

from __future__ import annotations

import logging

import discord
from discord import app_commands
from discord.ext import commands

from bot.service import ImagineService
from bot.settings import Settings

log = logging.getLogger(__name__)

EXTENSIONS = ("cogs.imagine", "cogs.variations", "cogs.member", "cogs.moderation")


class ImagineTree(app_commands.CommandTree):
    """The one error funnel for app commands: a member sees a short apology, never a traceback."""

    async def on_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        if isinstance(error, app_commands.MissingPermissions):
            message = "You need the Manage Server permission for this command."
        elif isinstance(error, app_commands.NoPrivateMessage):
            message = "This command works only in a server."
        else:
            name = interaction.command.qualified_name if interaction.command else "?"
            log.error("command %r failed", name, exc_info=error)
            message = "Something went wrong on our side; nothing was charged. Please try again."
        try:
            if interaction.response.is_done():
                await interaction.followup.send(message, ephemeral=True)
            else:
                await interaction.response.send_message(message, ephemeral=True)
        except discord.HTTPException:
            log.warning("could not tell the member about the error")


class ImagineBot(commands.Bot):
    def __init__(self, settings: Settings, service: ImagineService) -> None:
        # Slash commands, buttons and the context menu need no privileged intent; message
        # content is only needed to vary replies that do not mention the bot.
        intents = discord.Intents.default()
        intents.message_content = settings.message_content
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            tree_cls=ImagineTree,
            help_command=None,
        )
        self.settings = settings
        self.service = service

    async def setup_hook(self) -> None:
        """Load the cogs. The command tree is not synced here: `python -m bot sync` does that,
        because syncing is rate limited and rarely needed."""
        for extension in EXTENSIONS:
            try:
                await self.load_extension(extension)
            except commands.ExtensionError:
                log.exception("could not load %s", extension)
