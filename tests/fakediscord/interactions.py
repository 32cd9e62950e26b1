"""INTERACTION_CREATE payloads as Discord builds them (typed options, `resolved` data,
member permissions, app_permissions, …) and the handle a test uses to watch the bot answer."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import payloads
from .models import (
    FakeAttachment,
    FakeChannel,
    FakeMember,
    FakeMessage,
    FakeRole,
    FakeUser,
    InteractionCallback,
)

if TYPE_CHECKING:
    from .state import FakeState

ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024

# Option types (Discord's ApplicationCommandOptionType)
SUB_COMMAND, SUB_COMMAND_GROUP = 1, 2
STRING, INTEGER, BOOLEAN, USER, CHANNEL, ROLE, NUMBER, ATTACHMENT = 3, 4, 5, 6, 7, 8, 10, 11

# An attachment option value: (filename, data) or (filename, data, content_type)
Upload = tuple[str, bytes] | tuple[str, bytes, str]


@dataclass(eq=False)
class InteractionHandle:
    """One interaction the driver dispatched, and everything the bot did in answer."""

    id: int
    token: str
    type: int
    user: FakeUser
    channel_id: int
    guild_id: int | None
    payload: dict[str, Any]
    state: FakeState = field(repr=False)
    name: str | None = None  # command name
    command_type: int | None = None  # 1 slash, 2 user, 3 message
    target_id: int | None = None  # context menus
    message_id: int | None = None  # component interactions: the message clicked
    dispatched_at: float = 0.0
    responses: list[InteractionCallback] = field(default_factory=list)
    followup_ids: list[int] = field(default_factory=list)
    original_message_id: int | None = None

    @property
    def response(self) -> InteractionCallback | None:
        return self.responses[0] if self.responses else None

    @property
    def followups(self) -> list[FakeMessage]:
        return [self.state.messages_by_id[i] for i in self.followup_ids]

    async def wait_response(self, timeout: float = 10.0) -> InteractionCallback:
        """The first callback (defer, message, update, modal, autocomplete)."""
        return await self.state.changed.wait_for(
            lambda: self.response, timeout, f"a response to interaction {self.name or self.id}"
        )

    async def wait_followup(self, n: int = 1, timeout: float = 10.0) -> FakeMessage:
        """The nth (1-based) follow-up message. After a deferred response the first one
        fills in the "thinking" message, so it is also the original response."""

        def check() -> FakeMessage | None:
            return self.followups[n - 1] if len(self.followup_ids) >= n else None

        return await self.state.changed.wait_for(
            check, timeout, f"follow-up #{n} to interaction {self.name or self.id}"
        )

    async def original(self, timeout: float = 10.0) -> FakeMessage:
        """The original response message as it is now (after edits)."""

        def check() -> FakeMessage | None:
            if self.original_message_id is None:
                return None
            return self.state.messages_by_id[self.original_message_id]

        return await self.state.changed.wait_for(
            check, timeout, f"the original response to interaction {self.name or self.id}"
        )

    async def wait_original(
        self, predicate: Callable[[FakeMessage], bool] | None = None, timeout: float = 10.0
    ) -> FakeMessage:
        """The original response once `predicate(message)` holds, e.g. once it stops loading."""

        def check() -> FakeMessage | None:
            if self.original_message_id is None:
                return None
            message = self.state.messages_by_id[self.original_message_id]
            matches = predicate(message) if predicate else not message.loading
            return message if matches else None

        return await self.state.changed.wait_for(
            check, timeout, f"the original response to {self.name or self.id} to match"
        )


class InteractionBuilder:
    """Builds the `d` of INTERACTION_CREATE events for the driver."""

    def __init__(self, state: FakeState) -> None:
        self.state = state

    def new_handle(
        self, itype: int, user: FakeUser, channel: FakeChannel, data: dict[str, Any] | None
    ) -> InteractionHandle:
        state = self.state
        interaction_id = state.new_id()
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(120)
        guild = state.guild_of(channel)
        bot_id = state.bot_user.id
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(state.application_id),
            "type": itype,
            "token": token,
            "version": 1,
            "locale": "en-US",
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": ATTACHMENT_SIZE_LIMIT,
            "channel_id": str(channel.id),
            "channel": payloads.channel(
                state, channel, permissions=state.permissions_in(channel, user.id)
            ),
            "app_permissions": str(state.permissions_in(channel, bot_id)),
        }
        if data is not None:
            payload["data"] = data
        if guild is not None:
            member = guild.members.get(user.id)
            if member is None:
                raise LookupError(f"{user.username} is not a member of {guild.name}")
            payload.update(
                guild_id=str(guild.id),
                guild={"id": str(guild.id), "locale": "en-US", "features": []},
                guild_locale="en-US",
                member=payloads.member(member, permissions=state.permissions_in(channel, user.id)),
                authorizing_integration_owners={"0": str(guild.id)},
                context=0,
            )
        else:
            payload.update(
                user=payloads.user(user),
                authorizing_integration_owners={"0": str(user.id)},
                context=1,
            )
        handle = InteractionHandle(
            id=interaction_id,
            token=token,
            type=itype,
            user=user,
            channel_id=channel.id,
            guild_id=guild.id if guild else None,
            payload=payload,
            state=state,
        )
        state.interactions[interaction_id] = handle
        return handle

    # ---- application commands ---------------------------------------------------------------

    def command_data(
        self,
        channel: FakeChannel,
        name: str,
        command_type: int,
        *,
        guild_command: bool,
    ) -> dict[str, Any]:
        guild_id = channel.guild_id if guild_command else None
        data: dict[str, Any] = {
            "id": str(self._command_id(guild_id, name, command_type)),
            "name": name,
            "type": command_type,
        }
        if guild_id is not None:
            data["guild_id"] = str(guild_id)
        return data

    def _command_id(self, guild_id: int | None, name: str, command_type: int) -> int:
        for command in self.state.registered_commands.get(guild_id, []):
            if command["name"] == name and command.get("type", 1) == command_type:
                return int(command["id"])
        return self.state.command_id(guild_id, name, command_type)

    def options(
        self,
        channel: FakeChannel,
        values: Mapping[str, Any],
        attachments: Mapping[str, Upload],
        subcommands: Sequence[str],
        resolved: dict[str, dict[str, Any]],
        *,
        focused: str | None = None,
    ) -> list[dict[str, Any]]:
        """Typed options, nested under subcommand (group) options when given."""
        options = [self._option(channel, name, value, resolved) for name, value in values.items()]
        for name, upload in attachments.items():
            attachment = self.state.store_attachment(
                channel.id,
                upload[0],
                upload[1],
                content_type=upload[2] if len(upload) > 2 else None,  # type: ignore[misc]
                ephemeral=True,
            )
            options.append(self._option(channel, name, attachment, resolved))
        if focused is not None:
            for option in options:
                if option["name"] == focused:
                    option["focused"] = True
                    option["value"] = str(option["value"])
        for depth, sub in enumerate(reversed(subcommands)):
            kind = SUB_COMMAND if depth == 0 else SUB_COMMAND_GROUP
            options = [{"name": sub, "type": kind, "options": options}]
        return options

    def _option(
        self,
        channel: FakeChannel,
        name: str,
        value: Any,
        resolved: dict[str, dict[str, Any]],
    ) -> dict[str, Any]:
        state = self.state
        guild = state.guild_of(channel)
        if isinstance(value, bool):
            return {"name": name, "type": BOOLEAN, "value": value}
        if isinstance(value, int):
            return {"name": name, "type": INTEGER, "value": value}
        if isinstance(value, float):
            return {"name": name, "type": NUMBER, "value": value}
        if isinstance(value, str):
            return {"name": name, "type": STRING, "value": value}
        if isinstance(value, FakeMember | FakeUser):
            user = value.user if isinstance(value, FakeMember) else value
            self.resolve_user(channel, user, resolved)
            return {"name": name, "type": USER, "value": str(user.id)}
        if isinstance(value, FakeRole):
            resolved.setdefault("roles", {})[str(value.id)] = payloads.role(value)
            return {"name": name, "type": ROLE, "value": str(value.id)}
        if isinstance(value, FakeChannel):
            entry = {
                "id": str(value.id),
                "name": value.name,
                "type": value.type,
                "permissions": str(state.permissions_in(value, state.bot_user.id)),
                "flags": 0,
            }
            if guild is not None:
                entry["guild_id"] = str(guild.id)
            resolved.setdefault("channels", {})[str(value.id)] = entry
            return {"name": name, "type": CHANNEL, "value": str(value.id)}
        if isinstance(value, FakeAttachment):
            resolved.setdefault("attachments", {})[str(value.id)] = payloads.attachment(value)
            return {"name": name, "type": ATTACHMENT, "value": str(value.id)}
        raise TypeError(f"fake Discord cannot send an option of type {type(value).__name__}")

    def resolve_user(
        self, channel: FakeChannel, user: FakeUser, resolved: dict[str, dict[str, Any]]
    ) -> None:
        """Resolved users, plus their member (without `user`, with channel permissions)."""
        resolved.setdefault("users", {})[str(user.id)] = payloads.user(user)
        guild = self.state.guild_of(channel)
        member = guild.members.get(user.id) if guild else None
        if member is not None:
            resolved.setdefault("members", {})[str(user.id)] = payloads.member(
                member,
                with_user=False,
                permissions=self.state.permissions_in(channel, user.id),
            )

    # ---- components and modals --------------------------------------------------------------

    def component_data(
        self, message: FakeMessage, custom_id: str, values: Sequence[str] | None
    ) -> dict[str, Any]:
        component = message.find_component(custom_id)
        if component is None:
            raise LookupError(f"message {message.id} has no component with custom_id {custom_id!r}")
        if component.get("disabled"):
            raise LookupError(f"component {custom_id!r} is disabled; a user cannot use it")
        data: dict[str, Any] = {
            "custom_id": custom_id,
            "component_type": component["type"],
        }
        if "id" in component:
            data["id"] = component["id"]
        if component["type"] != 2:
            data["values"] = list(values or [])
        return data

    @staticmethod
    def modal_data(modal: dict[str, Any], values: Mapping[str, str]) -> dict[str, Any]:
        """The submitted modal: its layout with each text input's value filled in."""
        missing = set(values)

        def fill(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            result = []
            for item in items:
                if item.get("type") == 1:
                    result.append({"type": 1, "components": fill(item.get("components", []))})
                elif item.get("type") == 18 and isinstance(item.get("component"), dict):
                    inner = fill([item["component"]])
                    result.append({"type": 18, "id": item.get("id", 0), "component": inner[0]})
                elif "custom_id" in item:
                    custom_id = item["custom_id"]
                    missing.discard(custom_id)
                    entry: dict[str, Any] = {"type": item["type"], "custom_id": custom_id}
                    if item["type"] == 4:
                        entry["value"] = values.get(custom_id, item.get("value") or "")
                    else:
                        entry["values"] = list(values.get(custom_id, []))
                    result.append(entry)
            return result

        components = fill(modal.get("components", []))
        if missing:
            raise LookupError(f"the modal has no inputs named {sorted(missing)}")
        return {"custom_id": modal["custom_id"], "components": components}
