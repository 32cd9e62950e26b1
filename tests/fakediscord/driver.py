"""`FakeDiscord`: what a test holds. It starts the server, builds the world (guilds,
members, channels), plays the users (slash commands, clicks, messages) and waits for the
bot's answers."""

from __future__ import annotations

import asyncio
import base64
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from . import payloads
from .gateway import GatewayClose, GatewayHub, Intent
from .interactions import InteractionBuilder, InteractionHandle, Upload
from .models import (
    USER_MENTION,
    AppFlag,
    FakeChannel,
    FakeGuild,
    FakeMember,
    FakeMessage,
    FakeUser,
    Perm,
    RecordedRequest,
    Rejection,
)
from .server import API_PREFIX, build_app
from .state import FakeState

T = TypeVar("T")


class FakeDiscord:
    """A Discord API v10 + gateway on 127.0.0.1 that the real discord.py can log in to.

    Build the world (guilds and members) before the bot connects: the bot learns it from
    READY and GUILD_CREATE."""

    def __init__(
        self, *, heartbeat_interval_ms: int = 41250, interaction_ack_timeout: float = 3.0
    ) -> None:
        self._state = FakeState(token="", ack_timeout=interaction_ack_timeout)
        encoded_id = base64.b64encode(str(self._state.bot_user.id).encode()).decode().rstrip("=")
        self._state.token = f"{encoded_id}.{secrets.token_urlsafe(5)}.{secrets.token_urlsafe(27)}"
        self._hub = GatewayHub(self._state, heartbeat_interval_ms)
        self._state.hub = self._hub
        self._builder = InteractionBuilder(self._state)
        self._runner: web.AppRunner | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> FakeDiscord:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self._state.base_url = f"http://127.0.0.1:{port}"
        self._runner = web.AppRunner(
            build_app(self._state, self._hub), handle_signals=False, shutdown_timeout=0.5
        )
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        await self._hub.close_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- addresses and identity -------------------------------------------------------------

    @property
    def api_base(self) -> str:
        """For `bot.discord_api.use_api_base`, e.g. http://127.0.0.1:PORT/api/v10."""
        return self._state.base_url + API_PREFIX

    @property
    def token(self) -> str:
        return self._state.token

    @property
    def bot_user(self) -> FakeUser:
        return self._state.bot_user

    @property
    def bot_user_id(self) -> int:
        return self._state.bot_user.id

    # ---- what happened ----------------------------------------------------------------------

    @property
    def messages(self) -> list[FakeMessage]:
        """Every message the bot posted (channels, DMs, interaction responses, follow-ups)."""
        return self._state.bot_messages

    @property
    def requests(self) -> list[RecordedRequest]:
        return self._state.requests

    @property
    def unknown_routes(self) -> list[RecordedRequest]:
        return self._state.problems.unknown_routes

    @property
    def rejected(self) -> list[Rejection]:
        """Requests Discord would refuse as bot bugs (bad bodies, late or double acks)."""
        return self._state.problems.rejected

    @property
    def refused(self) -> list[Rejection]:
        """Every error answer, including expected ones such as 403 Missing Permissions."""
        return self._state.problems.refused

    @property
    def errors(self) -> list[str]:
        """Tracebacks of requests the fake itself failed to handle."""
        return self._state.problems.errors

    @property
    def heartbeats(self) -> list[float]:
        """Monotonic times at which the bot's heartbeats (op 1) arrived."""
        return self._hub.heartbeats

    @property
    def gateway_connects(self) -> list[dict[str, str]]:
        """Query of each websocket the bot opened (v, encoding, compress)."""
        return self._hub.connects

    @property
    def identifies(self) -> list[dict[str, Any]]:
        """The IDENTIFY payloads received (token, intents, properties, …)."""
        return self._hub.identifies

    @property
    def command_syncs(self) -> list[RecordedRequest]:
        """Every registration of the bot's commands (PUT, global or in a guild), in order."""
        return [r for r in self.requests if r.method == "PUT" and r.path.endswith("/commands")]

    def registered_commands(self, guild: FakeGuild | None = None) -> list[dict[str, Any]]:
        """The commands registered globally, or in `guild`."""
        return self._state.commands.get(None if guild is None else guild.id, [])

    def problems(self) -> list[str]:
        """Human-readable list of what should fail a test: unknown routes, rejected
        requests, crashes of the fake."""
        found = [f"unknown route: {r.method} {r.path}" for r in self.unknown_routes]
        found += [f"rejected: {r.method} {r.path} -> {r.status} {r.error}" for r in self.rejected]
        found += [f"fake Discord error: {e}" for e in self.errors]
        return found

    # ---- building the world -----------------------------------------------------------------

    def add_guild(self, name: str = "Test Server") -> FakeGuild:
        """A guild with @everyone, Moderator (Manage Server) and the bot's role, an owner,
        the bot as member, and a #general text channel (`guild.channel`)."""
        return self._state.add_guild(name)

    def guild(self, guild_id: int) -> FakeGuild:
        """The guild with this id (e.g. a member's: `fake.guild(member.guild_id)`)."""
        return self._state.guilds[guild_id]

    def add_member(self, guild: FakeGuild, username: str, *, moderator: bool = False) -> FakeMember:
        """A new user who is a member of `guild` (with its Moderator role if `moderator`)."""
        return self._state.add_member(guild, username, moderator=moderator)

    def dm_channel(self, member: FakeMember) -> FakeChannel:
        """The DM channel between the bot and `member` (what POST /users/@me/channels returns)."""
        return self._state.dm_channel(member.user)

    def add_channel(
        self, guild: FakeGuild, name: str, *, age_restricted: bool = False
    ) -> FakeChannel:
        """A text channel in `guild`; `age_restricted` is Discord's NSFW flag. A connected bot
        hears CHANNEL_CREATE."""
        channel = self._state.add_channel(guild, name, nsfw=age_restricted)
        self._hub.dispatch_if_connected(
            "CHANNEL_CREATE", payloads.channel(self._state, channel), intent=Intent.GUILDS
        )
        return channel

    def set_age_restricted(self, channel: FakeChannel, age_restricted: bool) -> None:
        """A moderator turns the channel's age restriction on or off (CHANNEL_UPDATE)."""
        channel.nsfw = age_restricted
        self._hub.dispatch_if_connected(
            "CHANNEL_UPDATE", payloads.channel(self._state, channel), intent=Intent.GUILDS
        )

    def deny_send(self, channel: FakeChannel, permissions: int = Perm.SEND_MESSAGES) -> None:
        """Deny the bot `permissions` in `channel` with a member overwrite, so posting there
        answers 403 / 50013 Missing Permissions (interaction responses still work, as on
        Discord)."""
        self._state.deny(channel, self.bot_user_id, permissions)
        self._hub.dispatch_if_connected(
            "CHANNEL_UPDATE", payloads.channel(self._state, channel), intent=Intent.GUILDS
        )

    def deny_in_guild(self, guild: FakeGuild, permissions: int) -> None:
        """Take `permissions` from @everyone and the bot's own role in `guild`, as an owner
        who invited the bot with fewer permissions than it asks for."""
        for role in guild.roles.values():
            if role.id == guild.id or role.bot_id == self.bot_user_id:
                role.permissions &= ~permissions

    def set_message_content_intent(self, enabled: bool) -> None:
        """Switch the privileged Message Content intent on or off in the "developer portal"."""
        flags = AppFlag.GATEWAY_MESSAGE_CONTENT | AppFlag.GATEWAY_MESSAGE_CONTENT_LIMITED
        self._state.application_flags &= ~flags
        if enabled:
            self._state.application_flags |= AppFlag.GATEWAY_MESSAGE_CONTENT

    # ---- the bot's connection ---------------------------------------------------------------

    async def wait_until_ready(self, timeout: float = 10.0) -> None:
        """Until the bot identified and READY plus every GUILD_CREATE went out."""
        try:
            await asyncio.wait_for(self._hub.ready.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"fake Discord: the bot did not connect and identify within {timeout}s"
            ) from None

    async def wait_for_close(self, timeout: float = 10.0) -> GatewayClose:
        """The first websocket close the bot initiated."""
        return await self._state.changed.wait_for(
            lambda: next((c for c in self._hub.closes if c.by_client), None),
            timeout,
            "the bot to close its gateway connection",
        )

    # ---- playing users ----------------------------------------------------------------------

    async def _dispatch_interaction(
        self, handle: InteractionHandle, timeout: float
    ) -> InteractionHandle:
        await self.wait_until_ready(timeout)
        # Provisional, so the 3 s acknowledgement clock runs even if the bot answers before
        # this coroutine resumes; then the time the event actually hit the wire.
        handle.dispatched_at = time.monotonic()
        sent = self._hub.dispatch("INTERACTION_CREATE", handle.payload)
        handle.dispatched_at = await asyncio.wait_for(sent, timeout)
        return handle

    async def slash_command(
        self,
        member: FakeMember,
        channel: FakeChannel,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        subcommands: Sequence[str] = (),
        attachments: Mapping[str, Upload] | None = None,
        timeout: float = 10.0,
    ) -> InteractionHandle:
        """Run `/name [subcommands…] options…` as `member` in `channel`.

        Option types follow the Python value: str 3, int 4, bool 5, float 10, member 6;
        `attachments` maps option names to (filename, bytes[, type]) uploads (type 11).
        `subcommands=("group", "sub")` nests the options."""
        data = self._builder.command_data(name, 1)
        resolved: dict[str, dict[str, Any]] = {}
        data["options"] = self._builder.options(
            channel, options or {}, attachments or {}, subcommands, resolved
        )
        if resolved:
            data["resolved"] = resolved
        handle = self._builder.new_handle(2, member, channel, data)
        handle.name, handle.command_type = name, 1
        return await self._dispatch_interaction(handle, timeout)

    async def autocomplete(
        self,
        member: FakeMember,
        channel: FakeChannel,
        name: str,
        options: Mapping[str, Any],
        focused: str,
        *,
        timeout: float = 10.0,
    ) -> InteractionHandle:
        """`member` types in option `focused` of `/name` (the text typed is its value in
        `options`, or nothing): Discord sends an APPLICATION_COMMAND_AUTOCOMPLETE interaction
        (type 4) and takes only choices back (callback type 8, see `wait_choices`)."""
        data = self._builder.command_data(name, 1)
        resolved: dict[str, dict[str, Any]] = {}
        data["options"], focused_type = self._builder.autocomplete_options(
            channel, name, options, focused, resolved
        )
        if resolved:
            data["resolved"] = resolved
        handle = self._builder.new_handle(4, member, channel, data)
        handle.name, handle.command_type, handle.focused_type = name, 1, focused_type
        return await self._dispatch_interaction(handle, timeout)

    async def message_command(
        self,
        member: FakeMember,
        channel: FakeChannel,
        name: str,
        target: FakeMessage,
        *,
        timeout: float = 10.0,
    ) -> InteractionHandle:
        """Run the message context-menu command `name` on `target`."""
        data = self._builder.command_data(name, 3)
        data["target_id"] = str(target.id)
        data["resolved"] = {
            "messages": {str(target.id): payloads.message(self._state, target, gateway=True)}
        }
        handle = self._builder.new_handle(2, member, channel, data)
        handle.name, handle.command_type, handle.target_id = name, 3, target.id
        return await self._dispatch_interaction(handle, timeout)

    async def click_button(
        self,
        member: FakeMember,
        message: FakeMessage,
        custom_id: str,
        *,
        forged: bool = False,
        timeout: float = 10.0,
    ) -> InteractionHandle:
        """Click the button `custom_id` on `message` (it must exist and be enabled), or, with
        `forged`, send any custom_id from that message as a hostile client could."""
        if message.deleted:
            raise LookupError(f"message {message.id} was deleted; nobody can click it")
        data = self._builder.component_data(message, custom_id, forged=forged)
        channel = self._state.channels[message.channel_id]
        handle = self._builder.new_handle(3, member, channel, data)
        handle.payload["message"] = payloads.message(self._state, message)
        handle.message_id = message.id
        handle.name = custom_id
        return await self._dispatch_interaction(handle, timeout)

    async def send_message(
        self,
        member: FakeMember,
        channel: FakeChannel,
        content: str = "",
        *,
        reply_to: FakeMessage | None = None,
        attachments: Sequence[tuple[str, bytes]] = (),
        mentions_bot: bool | None = None,
        timeout: float = 10.0,
    ) -> FakeMessage:
        """`member` posts in `channel` (a guild channel, or their DM with the bot) and the bot
        gets MESSAGE_CREATE (if its intents allow).

        `mentions_bot=True` pings the bot (prepending `<@bot>` unless it is a reply);
        by default a reply to one of the bot's messages pings it, as Discord's client does.
        Without the message content intent the bot sees empty content unless pinged."""
        await self.wait_until_ready(timeout)
        state = self._state
        if channel.guild_id not in (None, member.guild_id):
            raise LookupError(f"{member.user.username} is not a member of that channel's guild")
        if mentions_bot is None:
            mentions_bot = reply_to is not None and reply_to.author_id == self.bot_user_id
        if mentions_bot and reply_to is None and self.bot_user.mention not in content:
            content = f"{self.bot_user.mention} {content}".rstrip()
        message = FakeMessage(
            id=state.new_id(),
            channel_id=channel.id,
            author_id=member.id,
            guild_id=channel.guild_id,
            content=content,
            nonce=str(state.new_id()),
        )
        message.attachments = [
            state.store_attachment(channel.id, name, data) for name, data in attachments
        ]
        if reply_to is not None:
            message.reference = reply_to.id
            message.reference_channel_id = reply_to.channel_id
            message.type = 19
        mention_ids = [int(m) for m in USER_MENTION.findall(content) if int(m) in state.users]
        if mentions_bot and self.bot_user_id not in mention_ids:
            mention_ids.append(self.bot_user_id)
        message.mention_ids = mention_ids
        state.add_message(message, by_bot=False)
        sent = self._hub.message_created(message)
        if sent is not None:
            await asyncio.wait_for(sent, timeout)
        return message

    def plant_bot_message(
        self, channel: FakeChannel, content: str, custom_ids: Sequence[str]
    ) -> FakeMessage:
        """A message by the bot carrying buttons with `custom_ids`, made by the test: for
        buttons the bot would never post itself (malformed ids, another server's job)."""
        buttons = [{"type": 2, "style": 2, "label": "?", "custom_id": c} for c in custom_ids]
        data = {"content": content, "components": [{"type": 1, "components": buttons}]}
        return self._state.create_bot_message(channel.id, data, [])

    # ---- waiting for the bot ----------------------------------------------------------------

    async def wait_for_message(
        self, predicate: Callable[[FakeMessage], bool] = lambda m: True, timeout: float = 30.0
    ) -> FakeMessage:
        """The first bot message (in its current, possibly edited, state) that matches;
        messages already there count."""

        def check() -> FakeMessage | None:
            return next((m for m in self.messages if predicate(m)), None)

        def describe() -> str:
            recent = "; ".join(
                f"#{m.channel_id} {m.content[:60]!r}{' (deleted)' if m.deleted else ''}"
                for m in self.messages[-5:]
            )
            return f"a matching bot message (latest: {recent or 'none'})"

        return await self._state.changed.wait_for(check, timeout, describe)

    async def wait_until(
        self, check: Callable[[], T | None], timeout: float = 10.0, what: str = "a condition"
    ) -> T:
        """Re-evaluate `check` whenever the fake sees something happen, until it returns
        something other than None (or a falsy value other than None: only None waits)."""
        return await self._state.changed.wait_for(check, timeout, what)
