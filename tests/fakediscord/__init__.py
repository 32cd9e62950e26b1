"""A fake Discord (REST API v10 + gateway) on 127.0.0.1 that the real discord.py client
talks to, so the bot can be tested end to end without Discord.

    async with FakeDiscord() as fake:
        guild = fake.add_guild("Test Server")
        alice = fake.add_member(guild, "alice")
        use_api_base(fake.api_base)
        await bot.login(fake.token)
        await use_advertised_gateway(bot)
        task = asyncio.create_task(bot.connect())
        await fake.wait_until_ready()
        inter = await fake.slash_command(alice, guild.channel, "imagine", {"prompt": "a panda"})
        first = await inter.wait_response()
"""

from .driver import FakeDiscord
from .interactions import InteractionHandle
from .models import (
    FakeAttachment,
    FakeChannel,
    FakeGuild,
    FakeMember,
    FakeMessage,
    InteractionCallback,
)

__all__ = [
    "FakeAttachment",
    "FakeChannel",
    "FakeDiscord",
    "FakeGuild",
    "FakeMember",
    "FakeMessage",
    "InteractionCallback",
    "InteractionHandle",
]
