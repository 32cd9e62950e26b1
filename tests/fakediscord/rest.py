"""REST routes a bot uses outside interactions: gateway discovery, the bot user and
application, command registration, channel messages, DMs, typing and reactions."""

from __future__ import annotations

import json
import re
import secrets
import time
from typing import Any
from urllib.parse import unquote

from aiohttp import web

from . import payloads
from .bodies import BODY, RequestBody
from .gateway import APPLICATION_FLAGS, GatewayHub
from .models import FakeChannel, FakeGuild, FakeMessage, Perm
from .state import FakeState
from .validation import Refusal, check_message

COMMAND_NAME = re.compile(r"^[-_\w]{1,32}$")
MAX_COMMANDS = 100


def unknown(code: int, what: str) -> Refusal:
    """Discord's 404 for an id it does not know, e.g. 10003 "Unknown Channel"."""
    return Refusal(404, payloads.error(code, f"Unknown {what}"))


def missing_permissions() -> Refusal:
    return Refusal(403, payloads.error(50013, "Missing Permissions"))


def json_response(data: Any, status: int = 200) -> web.Response:
    """Exactly `Content-Type: application/json` (no charset), as Discord sends it:
    discord.py only parses bodies whose content type is exactly that."""
    return web.Response(
        body=json.dumps(data).encode(), status=status, content_type="application/json"
    )


def truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true")


def no_content() -> web.Response:
    return web.Response(status=204)


def body_of(request: web.Request) -> RequestBody:
    return request[BODY]


class RestApi:
    def __init__(self, state: FakeState, hub: GatewayHub) -> None:
        self.state = state
        self.hub = hub

    def routes(self) -> list[web.RouteDef]:
        channel_message = "/channels/{channel_id}/messages/{message_id}"
        return [
            web.get("/gateway", self.get_gateway),
            web.get("/gateway/bot", self.get_gateway_bot),
            web.get("/users/@me", self.get_me),
            web.post("/users/@me/channels", self.create_dm),
            web.get("/users/{user_id}", self.get_user),
            web.get("/oauth2/applications/@me", self.get_application),
            web.get("/applications/@me", self.get_application),
            web.get("/applications/{app_id}/commands", self.get_commands),
            web.put("/applications/{app_id}/commands", self.put_commands),
            web.post("/applications/{app_id}/commands", self.post_command),
            web.get("/applications/{app_id}/guilds/{guild_id}/commands", self.get_commands),
            web.put("/applications/{app_id}/guilds/{guild_id}/commands", self.put_commands),
            web.post("/applications/{app_id}/guilds/{guild_id}/commands", self.post_command),
            web.get("/guilds/{guild_id}", self.get_guild),
            web.get("/guilds/{guild_id}/channels", self.get_guild_channels),
            web.get("/guilds/{guild_id}/roles", self.get_roles),
            web.get("/guilds/{guild_id}/members/{user_id}", self.get_member),
            web.get("/channels/{channel_id}", self.get_channel),
            web.get("/channels/{channel_id}/messages", self.list_messages),
            web.post("/channels/{channel_id}/messages", self.post_message),
            web.get(channel_message, self.get_message),
            web.patch(channel_message, self.edit_message),
            web.delete(channel_message, self.delete_message),
            web.post("/channels/{channel_id}/typing", self.typing),
            web.put(channel_message + "/reactions/{emoji}/@me", self.add_reaction),
            web.delete(channel_message + "/reactions/{emoji}/@me", self.remove_reaction),
        ]

    # ---- gateway, users, application ---------------------------------------------------------

    async def get_gateway(self, request: web.Request) -> web.Response:
        return json_response({"url": self.hub.url})

    async def get_gateway_bot(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "url": self.hub.url,
                "shards": 1,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 14_400_000,
                    "max_concurrency": 1,
                },
            }
        )

    async def get_me(self, request: web.Request) -> web.Response:
        return json_response(payloads.current_user(self.state.bot_user))

    async def get_user(self, request: web.Request) -> web.Response:
        user = self.state.users.get(int(request.match_info["user_id"]))
        if user is None:
            raise unknown(10013, "User")
        return json_response(payloads.user(user))

    async def get_application(self, request: web.Request) -> web.Response:
        state = self.state
        return json_response(
            {
                "id": str(state.application_id),
                "name": state.bot_user.username,
                "icon": None,
                "description": "",
                "summary": "",
                "type": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "verify_key": secrets.token_hex(32),
                "flags": APPLICATION_FLAGS,
                "owner": payloads.user(state.app_owner),
                "team": None,
                "bot": payloads.user(state.bot_user),
                "hook": True,
                "is_monetized": False,
                "tags": [],
                "redirect_uris": [],
                "interactions_endpoint_url": None,
                "role_connections_verification_url": None,
                "approximate_guild_count": len(state.guilds),
                "install_params": {"scopes": ["bot", "applications.commands"], "permissions": "0"},
                "integration_types_config": {"0": {}},
            }
        )

    async def create_dm(self, request: web.Request) -> web.Response:
        recipient = body_of(request).object.get("recipient_id")
        user = self.state.users.get(int(recipient or 0))
        if user is None:
            raise unknown(10013, "User")
        return json_response(payloads.channel(self.state, self.state.dm_channel(user)))

    def _guild(self, request: web.Request) -> FakeGuild:
        guild = self.state.guilds.get(int(request.match_info["guild_id"]))
        if guild is None:
            raise unknown(10004, "Guild")
        return guild

    async def get_guild(self, request: web.Request) -> web.Response:
        guild = self._guild(request)
        body = payloads.guild(guild)
        if truthy(request.query.get("with_counts")):
            body.update(approximate_member_count=len(guild.members), approximate_presence_count=0)
        return json_response(body)

    async def get_guild_channels(self, request: web.Request) -> web.Response:
        guild = self._guild(request)
        return json_response([payloads.channel(self.state, c) for c in guild.channels.values()])

    async def get_roles(self, request: web.Request) -> web.Response:
        return json_response([payloads.role(r) for r in self._guild(request).roles.values()])

    async def get_member(self, request: web.Request) -> web.Response:
        guild = self._guild(request)
        member = guild.members.get(int(request.match_info["user_id"]))
        if member is None:
            raise unknown(10007, "Member")
        return json_response(payloads.member(member))

    # ---- application commands ---------------------------------------------------------------

    def _command_scope(self, request: web.Request) -> int | None:
        if int(request.match_info["app_id"]) != self.state.application_id:
            raise Refusal(403, payloads.error(50001, "Missing Access"), bot_error=True)
        guild_id = request.match_info.get("guild_id")
        if guild_id is None:
            return None
        if int(guild_id) not in self.state.guilds:
            raise Refusal(403, payloads.error(50001, "Missing Access"), bot_error=True)
        return int(guild_id)

    async def get_commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        return json_response(self.state.registered_commands.get(scope, []))

    async def put_commands(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        commands = body_of(request).json or []
        if len(commands) > MAX_COMMANDS:
            raise Refusal(
                400, payloads.error(30032, "Maximum number of application commands reached (100)")
            )
        stored = [self._store_command(scope, index, c) for index, c in enumerate(commands)]
        self.state.registered_commands[scope] = stored
        self.state.changed.notify()
        return json_response(stored)

    async def post_command(self, request: web.Request) -> web.Response:
        scope = self._command_scope(request)
        command = self._store_command(scope, 0, body_of(request).object)
        current = [
            c for c in self.state.registered_commands.get(scope, []) if c["id"] != command["id"]
        ]
        self.state.registered_commands[scope] = [*current, command]
        self.state.changed.notify()
        return json_response(command, status=201)

    def _store_command(
        self, scope: int | None, index: int, command: dict[str, Any]
    ) -> dict[str, Any]:
        command_type = command.get("type", 1)
        name = command.get("name") or ""
        description = command.get("description") or ""
        errors: dict[str, Any] = {}
        valid_name = COMMAND_NAME.match(name) and (command_type != 1 or name == name.lower())
        if not valid_name and command_type == 1:
            errors["name"] = {
                "_errors": [
                    {
                        "code": "APPLICATION_COMMAND_INVALID_NAME",
                        "message": "Command name is invalid",
                    }
                ]
            }
        if command_type == 1 and not 1 <= len(description) <= 100:
            errors["description"] = {
                "_errors": [
                    {
                        "code": "BASE_TYPE_BAD_LENGTH",
                        "message": "Must be between 1 and 100 in length.",
                    }
                ]
            }
        if len(command.get("options") or []) > 25:
            errors["options"] = {
                "_errors": [
                    {"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 25 or fewer in length."}
                ]
            }
        if errors:
            raise Refusal(400, payloads.error(50035, "Invalid Form Body", {str(index): errors}))
        stored = {
            "id": str(self.state.command_id(scope, name, command_type)),
            "application_id": str(self.state.application_id),
            "version": str(self.state.new_id()),
            "type": command_type,
            "name": name,
            "name_localizations": command.get("name_localizations"),
            "description": description,
            "description_localizations": command.get("description_localizations"),
            "default_member_permissions": command.get("default_member_permissions"),
            "dm_permission": command.get("dm_permission", True),
            "contexts": command.get("contexts"),
            "integration_types": command.get("integration_types") or [0],
            "nsfw": command.get("nsfw", False),
        }
        if command.get("options"):
            stored["options"] = command["options"]
        if scope is not None:
            stored["guild_id"] = str(scope)
        return stored

    # ---- channels and messages --------------------------------------------------------------

    def _channel(self, request: web.Request) -> FakeChannel:
        channel = self.state.channels.get(int(request.match_info["channel_id"]))
        if channel is None:
            raise unknown(10003, "Channel")
        return channel

    def _message(self, request: web.Request, channel: FakeChannel) -> FakeMessage:
        message = self.state.messages_by_id.get(int(request.match_info["message_id"]))
        if (
            message is None
            or message.channel_id != channel.id
            or message.deleted
            or message.ephemeral
        ):
            raise unknown(10008, "Message")
        return message

    def _require(self, channel: FakeChannel, permissions: int) -> None:
        """403 unless the bot has `permissions` in the channel (50001 without VIEW_CHANNEL)."""
        if channel.is_dm:
            if channel.recipient_id in self.state.dm_blocked:
                raise Refusal(403, payloads.error(50007, "Cannot send messages to this user"))
            return
        have = self.state.permissions_in(channel, self.state.bot_user.id)
        if not have & Perm.VIEW_CHANNEL:
            raise Refusal(403, payloads.error(50001, "Missing Access"))
        if have & permissions != permissions:
            raise missing_permissions()

    async def get_channel(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        return json_response(payloads.channel(self.state, channel))

    async def list_messages(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        self._require(channel, Perm.VIEW_CHANNEL | Perm.READ_MESSAGE_HISTORY)
        messages = self.state.visible_messages(channel.id)
        query = request.query
        limit = max(1, min(100, int(query.get("limit", 50))))
        if "before" in query:
            messages = [m for m in messages if m.id < int(query["before"])]
        if "after" in query:
            messages = [m for m in messages if m.id > int(query["after"])][:limit]
        if "around" in query:
            around = int(query["around"])
            older = [m for m in messages if m.id <= around][-((limit + 1) // 2) :]
            newer = [m for m in messages if m.id > around][: limit // 2]
            messages = older + newer
        newest_first = sorted(messages, key=lambda m: m.id, reverse=True)[:limit]
        return json_response([payloads.message(self.state, m) for m in newest_first])

    async def get_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        self._require(channel, Perm.VIEW_CHANNEL | Perm.READ_MESSAGE_HISTORY)
        return json_response(payloads.message(self.state, self._message(request, channel)))

    async def post_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        body = body_of(request)
        data = body.object
        needed = Perm.VIEW_CHANNEL | Perm.SEND_MESSAGES
        if body.files:
            needed |= Perm.ATTACH_FILES
        self._require(channel, needed)
        check_message(data, body.files, creating=True)
        nonce = data.get("nonce")
        key = (channel.id, str(nonce))
        if nonce is not None and data.get("enforce_nonce") and key in self.state.nonces:
            earlier = self.state.messages_by_id[self.state.nonces[key]]
            return json_response(payloads.message(self.state, earlier))
        message = self.state.create_bot_message(channel.id, data, body.files)
        if nonce is not None and data.get("enforce_nonce"):
            self.state.nonces[key] = message.id
        return json_response(payloads.message(self.state, message))

    async def edit_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        message = self._message(request, channel)
        if message.author_id != self.state.bot_user.id:
            raise Refusal(
                403,
                payloads.error(50005, "Cannot edit a message authored by another user"),
                bot_error=True,
            )
        body = body_of(request)
        check_message(
            body.object, body.files, creating=False, existing_attachments=len(message.attachments)
        )
        self.state.edit_message(message, body.object, body.files)
        return json_response(payloads.message(self.state, message))

    async def delete_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        message = self._message(request, channel)
        if message.author_id != self.state.bot_user.id:
            self._require(channel, Perm.MANAGE_MESSAGES)
        self.state.delete_message(message)
        return no_content()

    async def typing(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        self._require(channel, Perm.VIEW_CHANNEL | Perm.SEND_MESSAGES)
        self.state.typing.append((channel.id, time.monotonic()))
        self.state.changed.notify()
        return no_content()

    async def add_reaction(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        message = self._message(request, channel)
        self._require(channel, Perm.VIEW_CHANNEL | Perm.ADD_REACTIONS | Perm.READ_MESSAGE_HISTORY)
        emoji = unquote(request.match_info["emoji"])
        if emoji not in message.reactions:
            message.reactions.append(emoji)
            self.state.changed.notify()
        return no_content()

    async def remove_reaction(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        message = self._message(request, channel)
        emoji = unquote(request.match_info["emoji"])
        if emoji in message.reactions:
            message.reactions.remove(emoji)
            self.state.changed.notify()
        return no_content()
