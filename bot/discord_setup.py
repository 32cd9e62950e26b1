"""What the bot sets up with Discord by itself: its slash commands, registered only when the
command tree changed since the last registration (a hash kept in SQLite, so restarts never
spend Discord's sync rate limit), and the invite link with exactly the permissions it uses."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bot.db import state

if TYPE_CHECKING:
    from bot.db import Store

log = logging.getLogger(__name__)

SCOPES = ("bot", "applications.commands")
# Derived from what cogs/ does outside interaction responses: results and statuses are
# posted to the channel (or thread) the command came from, with PNG files and embeds
# (cogs/delivery.py), which first reads the recent history for an earlier copy; a reply is
# varied after fetching the message it answers (cogs/variations.py). Emojis are Unicode only.
PERMISSIONS = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    embed_links=True,
    attach_files=True,
    read_message_history=True,
)


def invite_url(application_id: int) -> str:
    """The OAuth2 link a server owner opens to add the bot with its commands."""
    return discord.utils.oauth_url(application_id, permissions=PERMISSIONS, scopes=SCOPES)


def permission_names(value: discord.Permissions) -> list[str]:
    """'Send Messages', 'Attach Files', ... for the permissions set in `value`."""
    return [name.replace("_", " ").title() for name, on in value if on]


async def fetch_application_id(token: str) -> int:
    """The application id behind `token`, from `GET /oauth2/applications/@me` (which
    discord.py's login makes); raises discord.LoginFailure for a token Discord refuses."""
    async with discord.Client(intents=discord.Intents.none()) as client:
        await client.login(token)
        assert client.application_id is not None
        return client.application_id


def _target(guild_id: int | None) -> discord.Object | None:
    return None if guild_id is None else discord.Object(guild_id)


def command_payloads(tree: app_commands.CommandTree, guild_id: int | None) -> list[dict[str, Any]]:
    """The JSON Discord receives on a sync: the global commands, or with DEV_GUILD_ID their
    copy in that server."""
    guild = _target(guild_id)
    if guild is not None:
        tree.copy_global_to(guild=guild)
    commands = tree.get_commands(guild=guild)
    return sorted(
        (command.to_dict(tree) for command in commands),
        key=lambda payload: (payload.get("type", 1), payload["name"]),
    )


def tree_hash(payloads: list[dict[str, Any]]) -> str:
    """Stable across runs: the payloads with sorted keys, hashed."""
    text = json.dumps(payloads, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _state_name(guild_id: int | None) -> str:
    return "commands:global" if guild_id is None else f"commands:guild:{guild_id}"


async def register_commands(
    tree: app_commands.CommandTree, store: Store, guild_id: int | None, *, force: bool = False
) -> list[app_commands.AppCommand] | None:
    """Sync the tree (to `guild_id` at once, else globally) if it differs from the one last
    registered there, or if `force`; record its hash. None when nothing had to be sent."""
    digest = tree_hash(command_payloads(tree, guild_id))
    name = _state_name(guild_id)
    if not force and await store.read(state.get, name) == digest:
        log.info("slash commands unchanged since they were registered; not syncing")
        return None
    synced = await tree.sync(guild=_target(guild_id))
    await store.write(state.put, name, digest)
    where = "globally (may take up to an hour)" if guild_id is None else f"in server {guild_id}"
    log.info("registered %d slash command(s) %s", len(synced), where)
    return synced


async def registered_names(tree: app_commands.CommandTree, guild_id: int | None) -> set[str]:
    """The names Discord has registered for the bot (globally, or in DEV_GUILD_ID)."""
    return {command.name for command in await tree.fetch_commands(guild=_target(guild_id))}


async def set_up_on_start(
    tree: app_commands.CommandTree, application_id: int, store: Store, guild_id: int | None
) -> None:
    """Log the invite link and register the commands if they changed. A refused sync (the bot
    is not in DEV_GUILD_ID, Discord is down) is logged, not fatal: the bot still serves
    commands registered earlier, and the next start tries again."""
    log.info("invite link: %s", invite_url(application_id))
    try:
        await register_commands(tree, store, guild_id)
    except discord.HTTPException as error:
        log.warning(
            "could not register the slash commands (%s); the next start tries again, "
            "or run `python -m bot sync`",
            error,
        )
