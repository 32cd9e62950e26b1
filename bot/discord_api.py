"""Point discord.py at a Discord-compatible API other than discord.com (a rate-limit proxy,
or the fake Discord the tests serve on 127.0.0.1)."""

from __future__ import annotations

import discord
import yarl
from discord.gateway import DiscordWebSocket


def use_api_base(base: str) -> None:
    """Send every REST call, webhooks and interaction callbacks included, to `base`
    (for example `http://127.0.0.1:8080/api/v10`)."""
    discord.http.Route.BASE = base.rstrip("/")


async def use_advertised_gateway(client: discord.Client) -> None:
    """Connect the websocket to the gateway that the API base advertises in `GET /gateway/bot`,
    since a plain client otherwise dials Discord's default gateway. Call after login."""
    _shards, url, _limits = await client.http.get_bot_gateway()
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(url)
