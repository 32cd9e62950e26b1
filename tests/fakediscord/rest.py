"""REST routes the bot uses outside interactions: gateway discovery, the bot user and
application, channel messages and DMs."""

from __future__ import annotations

import json
import secrets
from typing import Any

from aiohttp import web

from . import payloads
from .bodies import BODY, RequestBody
from .gateway import GatewayHub
from .models import FakeChannel, FakeMessage, Perm
from .state import FakeState
from .validation import Refusal, check_message


def unknown(code: int, what: str) -> Refusal:
    """Discord's 404 for an id it does not know, e.g. 10003 "Unknown Channel"."""
    return Refusal(404, payloads.error(code, f"Unknown {what}"))


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
            web.get("/gateway/bot", self.get_gateway_bot),
            web.get("/users/@me", self.get_me),
            web.post("/users/@me/channels", self.create_dm),
            web.get("/users/{user_id}", self.get_user),
            web.get("/oauth2/applications/@me", self.get_application),
            web.get("/channels/{channel_id}/messages", self.list_messages),
            web.post("/channels/{channel_id}/messages", self.post_message),
            web.patch(channel_message, self.edit_message),
            web.delete(channel_message, self.delete_message),
        ]

    # ---- gateway, users, application ---------------------------------------------------------

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
                "flags": state.application_flags,
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
            return
        have = self.state.permissions_in(channel, self.state.bot_user.id)
        if not have & Perm.VIEW_CHANNEL:
            raise Refusal(403, payloads.error(50001, "Missing Access"))
        if have & permissions != permissions:
            raise Refusal(403, payloads.error(50013, "Missing Permissions"))

    async def list_messages(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        self._require(channel, Perm.VIEW_CHANNEL | Perm.READ_MESSAGE_HISTORY)
        messages = self.state.visible_messages(channel.id)
        limit = max(1, min(100, int(request.query.get("limit", 50))))
        newest_first = sorted(messages, key=lambda m: m.id, reverse=True)[:limit]
        return json_response([payloads.message(self.state, m) for m in newest_first])

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
        self.state.edit_checked(message, body.object, body.files)
        return json_response(payloads.message(self.state, message))

    async def delete_message(self, request: web.Request) -> web.Response:
        channel = self._channel(request)
        message = self._message(request, channel)
        if message.author_id != self.state.bot_user.id:
            self._require(channel, Perm.MANAGE_MESSAGES)
        self.state.delete_message(message)
        return no_content()
