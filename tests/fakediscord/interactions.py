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
    FakeUser,
    InteractionCallback,
)

if TYPE_CHECKING:
    from .state import FakeState

ATTACHMENT_SIZE_LIMIT = 10 * 1024 * 1024

# Option types (Discord's ApplicationCommandOptionType)
SUB_COMMAND, SUB_COMMAND_GROUP = 1, 2
STRING, INTEGER, BOOLEAN, USER, NUMBER, ATTACHMENT = 3, 4, 5, 6, 10, 11

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
    command_type: int | None = None  # 1 slash, 3 message
    target_id: int | None = None  # message context menu
    message_id: int | None = None  # component interactions: the message clicked
    focused_type: int | None = None  # autocomplete: the type of the option being typed in
    dispatched_at: float = 0.0
    responses: list[InteractionCallback] = field(default_factory=list)
    followup_ids: list[int] = field(default_factory=list)
    original_message_id: int | None = None

    @property
    def response(self) -> InteractionCallback | None:
        return self.responses[0] if self.responses else None

    async def wait_choices(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """An autocomplete interaction's answer: the choices offered, as the bot sent them."""
        response = await self.wait_response(timeout)
        assert response.type == 8, f"autocomplete answered with callback type {response.type}"
        return list(response.data["choices"])

    @property
    def followups(self) -> list[FakeMessage]:
        return [self.state.messages_by_id[i] for i in self.followup_ids]

    async def wait_response(self, timeout: float = 10.0) -> InteractionCallback:
        """The first callback (defer, message or update)."""
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
        return await self.wait_original(lambda message: True, timeout)

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
        self, itype: int, member: FakeMember, channel: FakeChannel, data: dict[str, Any]
    ) -> InteractionHandle:
        """An interaction by `member` in a guild text channel, or in their DM with the bot
        (then Discord sends `user` instead of `member` and no guild: context 1)."""
        state = self.state
        guild = state.guild_of(channel)
        if guild is not None and guild.id != member.guild_id:
            raise LookupError(f"{member.user.username} is not a member of that channel's guild")
        if channel.is_dm and channel.recipient_id != member.id:
            raise LookupError(f"that DM channel is not {member.user.username}'s")
        interaction_id = state.new_id()
        token = "aW50ZXJhY3Rpb246" + secrets.token_urlsafe(120)
        permissions = state.permissions_in(channel, member.id)
        payload: dict[str, Any] = {
            "id": str(interaction_id),
            "application_id": str(state.application_id),
            "type": itype,
            "data": data,
            "token": token,
            "version": 1,
            "locale": "en-US",
            "entitlements": [],
            "entitlement_sku_ids": [],
            "attachment_size_limit": ATTACHMENT_SIZE_LIMIT,
            "channel_id": str(channel.id),
            "channel": payloads.channel(state, channel, permissions=permissions),
            "app_permissions": str(state.permissions_in(channel, state.bot_user.id)),
        }
        if guild is None:
            payload.update(
                user=payloads.user(member.user),
                authorizing_integration_owners={"1": str(member.id)},
                context=1,
            )
        else:
            payload.update(
                guild_id=str(guild.id),
                guild={"id": str(guild.id), "locale": "en-US", "features": []},
                guild_locale="en-US",
                member=payloads.member(member, permissions=permissions),
                authorizing_integration_owners={"0": str(guild.id)},
                context=0,
            )
        handle = InteractionHandle(
            id=interaction_id,
            token=token,
            type=itype,
            user=member.user,
            channel_id=channel.id,
            guild_id=guild.id if guild else None,
            payload=payload,
            state=state,
        )
        state.interactions[interaction_id] = handle
        return handle

    # ---- application commands ---------------------------------------------------------------

    def command_data(self, name: str, command_type: int) -> dict[str, Any]:
        """A global command's data (options and targets are added by the caller)."""
        command_id = self.state.command_id(name, command_type)
        return {"id": str(command_id), "name": name, "type": command_type}

    def options(
        self,
        channel: FakeChannel,
        values: Mapping[str, Any],
        attachments: Mapping[str, Upload],
        subcommands: Sequence[str],
        resolved: dict[str, dict[str, Any]],
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
        if isinstance(value, bool):
            return {"name": name, "type": BOOLEAN, "value": value}
        if isinstance(value, int):
            return {"name": name, "type": INTEGER, "value": value}
        if isinstance(value, float):
            return {"name": name, "type": NUMBER, "value": value}
        if isinstance(value, str):
            return {"name": name, "type": STRING, "value": value}
        if isinstance(value, FakeMember):
            # The user, plus their member (without `user`, with channel permissions).
            key = str(value.id)
            resolved.setdefault("users", {})[key] = payloads.user(value.user)
            resolved.setdefault("members", {})[key] = payloads.member(
                value, with_user=False, permissions=self.state.permissions_in(channel, value.id)
            )
            return {"name": name, "type": USER, "value": key}
        if isinstance(value, FakeAttachment):
            resolved.setdefault("attachments", {})[str(value.id)] = payloads.attachment(value)
            return {"name": name, "type": ATTACHMENT, "value": str(value.id)}
        raise TypeError(f"fake Discord cannot send an option of type {type(value).__name__}")

    def autocomplete_options(
        self,
        channel: FakeChannel,
        name: str,
        values: Mapping[str, Any],
        focused: str,
        resolved: dict[str, dict[str, Any]],
    ) -> tuple[list[dict[str, Any]], int]:
        """The options of `/name` as typed so far, `focused` marked, and that option's type.
        Discord asks only about an option registered with `autocomplete`: anything else is a
        mistake in the test, raised as LookupError."""
        registered = next(
            (
                command
                for commands in self.state.commands.values()
                for command in commands
                if command["name"] == name and command.get("type", 1) == 1
            ),
            None,
        )
        if registered is None:
            raise LookupError(f"/{name} is not registered")
        option = next(
            (o for o in registered.get("options") or [] if o.get("name") == focused), None
        )
        if option is None or not option.get("autocomplete"):
            raise LookupError(f"/{name} has no option {focused!r} with autocomplete")
        options = [self._option(channel, key, value, resolved) for key, value in values.items()]
        typed = next((o for o in options if o["name"] == focused), None)
        if typed is None:  # nothing typed yet: Discord sends an empty string
            typed = {"name": focused, "value": ""}
            options.append(typed)
        # The focused value is whatever is typed so far, a string even for numbers.
        typed.update(type=option["type"], value=str(typed["value"]), focused=True)
        return options, option["type"]

    # ---- components -------------------------------------------------------------------------

    @staticmethod
    def component_data(
        message: FakeMessage, custom_id: str, *, forged: bool = False
    ) -> dict[str, Any]:
        """A button click on `message` (the button must exist and be enabled). `forged`: a
        hostile client sends a custom_id the message does not have (a plain button's type)."""
        if forged:
            return {"custom_id": custom_id, "component_type": 2}
        component = message.find_component(custom_id)
        if component is None:
            raise LookupError(f"message {message.id} has no component with custom_id {custom_id!r}")
        if component.get("disabled"):
            raise LookupError(f"component {custom_id!r} is disabled; a user cannot use it")
        data: dict[str, Any] = {"custom_id": custom_id, "component_type": component["type"]}
        if "id" in component:
            data["id"] = component["id"]
        return data
