"""Bringing the bot online and taking it off again: the one sequence `python -m bot` and the
test harness both run, so that what the tests start is what production starts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from bot.discord_api import use_advertised_gateway
from bot.discord_setup import set_up_on_start

if TYPE_CHECKING:
    from bot.app import ImagineBot
    from bot.service import ImagineService
    from bot.settings import Settings


async def shut_down(settings: Settings, service: ImagineService, bot: ImagineBot) -> None:
    """Stop admitting, let the running batch finish and deliver within the grace, then leave
    the gateway (the order SIGTERM asks for: a member still gets the batch that was running)."""
    try:
        await service.close(settings.shutdown_grace)
    finally:
        await bot.close()


@asynccontextmanager
async def online(
    settings: Settings, service: ImagineService, bot: ImagineBot
) -> AsyncIterator[asyncio.Task[None]]:
    """Load the model, log in, register the slash commands if they changed, start the executor
    and connect; inside, the bot is on the gateway until the yielded task ends. On exit,
    `shut_down` unless that already happened."""
    try:
        await service.load_model()  # a missing model fails here, before Discord is contacted
        async with bot:
            await bot.login(settings.discord_token)
            if settings.discord_api_base:
                await use_advertised_gateway(bot)
            assert bot.application_id is not None  # login read it
            await set_up_on_start(
                bot.tree, bot.application_id, service.store, settings.dev_guild_id
            )
            await service.start()
            connection = asyncio.create_task(bot.connect(), name="bot.connect")
            try:
                yield connection
            finally:
                if not connection.done():
                    await shut_down(settings, service, bot)
                await connection  # raises what ended the connection, if it failed
    finally:
        await service.close()
