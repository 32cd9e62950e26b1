"""The Bot: the composition root of the Discord side. It owns the status board, the admission
desk and the delivery (created once, used by every cog and button), wires them to the service,
loads the cogs, and sends app-command errors to the one error funnel."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.service import ImagineService
from bot.settings import Settings
from cogs.admission import AdmissionDesk
from cogs.buttons import PERSISTENT_BUTTONS, answer_stray_click
from cogs.common import answer_failure
from cogs.delivery import Delivery
from cogs.operations import RESULT_BUTTONS
from cogs.status import StatusBoard

if TYPE_CHECKING:
    from bot.db import Store

log = logging.getLogger(__name__)

EXTENSIONS = ("cogs.imagine", "cogs.variations", "cogs.member", "cogs.moderation", "cogs.models")


class ImagineTree(app_commands.CommandTree):
    """Slash commands and context menus fail into the same funnel as buttons."""

    async def on_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        await answer_failure(interaction, error)


class ImagineBot(commands.Bot):
    """Everything the cogs and buttons read from the bot is declared here."""

    settings: Settings
    service: ImagineService
    store: Store
    status_board: StatusBoard
    desk: AdmissionDesk
    delivery: Delivery
    dynamic_buttons = (*PERSISTENT_BUTTONS, *RESULT_BUTTONS)  # buttons that outlive a restart

    def __init__(self, settings: Settings, service: ImagineService) -> None:
        """Intents, mentions and the Discord-side parts every cog reads, made once."""
        # Slash commands, buttons and the context menu need no privileged intent; message
        # content is only needed to vary replies that do not mention the bot.
        intents = discord.Intents.default()
        intents.message_content = settings.message_content
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            tree_cls=ImagineTree,
            help_command=None,
            # Nobody is pinged unless a message says so: a member's text echoed back (a prompt,
            # an option value) cannot reach @everyone, a role or another member. A result
            # allows its requester's mention on that message alone (cogs/delivery.py).
            allowed_mentions=discord.AllowedMentions.none(),
        )
        self.settings = settings
        self.service = service
        self.store = service.store
        self.status_board = StatusBoard(service)
        self.desk = AdmissionDesk(service, self.status_board)
        self.delivery = Delivery(self, service.store, self.status_board)
        self._listening = False

    async def setup_hook(self) -> None:
        """Listen to the service and load the cogs. The command tree is not synced here:
        bot/lifecycle.py registers it after login, and only when it changed (syncing is rate
        limited), or `python -m bot sync` does."""
        self.add_dynamic_items(*self.dynamic_buttons)
        self.add_listener(answer_stray_click, "on_interaction")
        self.service.add_listener(self.delivery.deliver)
        self.service.add_progress_listener(self.status_board.on_progress)
        self.status_board.start()
        self._listening = True
        for extension in EXTENSIONS:
            try:
                await self.load_extension(extension)
            except commands.ExtensionError:
                log.exception("could not load %s", extension)

    async def close(self) -> None:
        """Stop hearing from the service before leaving the gateway."""
        if self._listening:
            self._listening = False
            self.service.remove_listener(self.delivery.deliver)
            self.service.remove_progress_listener(self.status_board.on_progress)
            await self.status_board.stop()
        await super().close()
