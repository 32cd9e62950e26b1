"""Everything the fake knows, and the operations REST, gateway and driver share on it:
building guilds, computing permissions, storing uploads, creating and editing messages."""

from __future__ import annotations

import asyncio
import io
import mimetypes
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from .bodies import UploadedFile
from .models import (
    EVERYONE_MENTION,
    USER_MENTION,
    AppFlag,
    FakeAttachment,
    FakeChannel,
    FakeGuild,
    FakeMember,
    FakeMessage,
    FakeRole,
    FakeUser,
    MessageFlag,
    Overwrite,
    Perm,
    RecordedRequest,
    Rejection,
    Snowflakes,
    now,
)
from .validation import check_message, field_error, invalid_form

if TYPE_CHECKING:
    from .gateway import GatewayHub
    from .interactions import InteractionHandle

T = TypeVar("T")

try:  # width/height of uploaded images, as Discord reports them
    from PIL import Image
except ImportError:  # pragma: no cover - Pillow is a project dependency
    Image = None

# Flags a bot may set when sending; anything else Discord ignores.
SENDABLE_FLAGS = (
    MessageFlag.SUPPRESS_EMBEDS | MessageFlag.EPHEMERAL | MessageFlag.SUPPRESS_NOTIFICATIONS
)


class Notifier:
    """Lets driver calls wait for "something changed" (a message, a callback, a heartbeat)
    and then re-check their condition right away rather than on a slow poll."""

    POLL_INTERVAL = 0.05

    def __init__(self, errors: list[str]) -> None:
        self._waiters: set[asyncio.Future[None]] = set()
        self._errors = errors  # the fake's own crashes end every wait at once

    def notify(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    async def wait_for(
        self,
        check: Callable[[], T | None],
        timeout: float,
        what: str | Callable[[], str],
    ) -> T:
        """Return the first non-None result of `check`, re-checking after each change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        known_errors = len(self._errors)
        while True:
            result = check()
            if result is not None:
                return result
            if len(self._errors) > known_errors:
                raise RuntimeError(f"fake Discord failed a request:\n{self._errors[-1]}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                description = what() if callable(what) else what
                raise TimeoutError(
                    f"fake Discord: timed out after {timeout}s waiting for {description}"
                )
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.add(waiter)
            try:  # also re-check now and then, for conditions on things outside the fake
                await asyncio.wait_for(waiter, min(remaining, self.POLL_INTERVAL))
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(waiter)


@dataclass
class Problems:
    """What went wrong during a test, from Discord's point of view or the fake's."""

    unknown_routes: list[RecordedRequest] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)  # bodies/acks Discord would refuse
    refused: list[Rejection] = field(default_factory=list)  # every refusal, 403s included
    errors: list[str] = field(default_factory=list)  # the fake's own crashes


class FakeState:
    def __init__(self, *, token: str, ack_timeout: float) -> None:
        self.snowflakes = Snowflakes()
        self.token = token
        self.ack_timeout = ack_timeout
        self.application_id = self.snowflakes.next()
        self.bot_user = FakeUser(
            self.application_id, "Imagine Test Bot", None, bot=True, discriminator="4242"
        )
        self.base_url = ""  # http://127.0.0.1:PORT once the server listens
        self.hub: GatewayHub | None = None
        self.problems = Problems()
        self.changed = Notifier(self.problems.errors)

        self.app_owner = FakeUser(self.snowflakes.next(), "bot-developer", "Bot Developer")
        self.users: dict[int, FakeUser] = {
            self.bot_user.id: self.bot_user,
            self.app_owner.id: self.app_owner,
        }
        self.guilds: dict[int, FakeGuild] = {}
        self.channels: dict[int, FakeChannel] = {}
        self.dm_channels: dict[int, FakeChannel] = {}  # by recipient user id
        self.messages_by_id: dict[int, FakeMessage] = {}
        self.all_messages: list[FakeMessage] = []
        self.bot_messages: list[FakeMessage] = []
        self.attachments: dict[int, FakeAttachment] = {}
        self.interactions: dict[int, InteractionHandle] = {}
        self.command_ids: dict[tuple[str, int], int] = {}
        self.application_flags = AppFlag.DEFAULT
        # Registered application commands: None holds the global ones, else by guild id.
        self.commands: dict[int | None, list[dict[str, Any]]] = {}
        self.requests: list[RecordedRequest] = []
        self.nonces: dict[tuple[int, str], int] = {}

    # ---- world building -------------------------------------------------------------------

    def new_id(self) -> int:
        return self.snowflakes.next()

    def add_user(self, username: str) -> FakeUser:
        user = FakeUser(self.new_id(), username, username.capitalize())
        self.users[user.id] = user
        return user

    def add_guild(self, name: str) -> FakeGuild:
        guild_id = self.new_id()
        owner = self.add_user(f"{name.lower().replace(' ', '')}-owner")
        guild = FakeGuild(guild_id, name, owner_id=owner.id)
        guild.roles[guild_id] = FakeRole(guild_id, "@everyone", Perm.EVERYONE, position=0)
        moderator = FakeRole(self.new_id(), "Moderator", Perm.EVERYONE | Perm.MODERATOR, 1)
        bot_role = FakeRole(
            self.new_id(),
            self.bot_user.username,
            Perm.BOT,
            2,
            managed=True,
            bot_id=self.bot_user.id,
        )
        guild.roles[moderator.id] = moderator
        guild.roles[bot_role.id] = bot_role
        guild.moderator_role_id = moderator.id
        self.guilds[guild_id] = guild
        guild.members[owner.id] = FakeMember(owner, guild_id)
        guild.members[self.bot_user.id] = FakeMember(self.bot_user, guild_id, [bot_role.id])
        guild.default_channel_id = self.add_channel(guild, "general").id
        return guild

    def add_member(self, guild: FakeGuild, username: str, *, moderator: bool = False) -> FakeMember:
        user = self.add_user(username)
        role_ids = [guild.moderator_role_id] if moderator else []
        member = FakeMember(user, guild.id, role_ids)
        guild.members[user.id] = member
        return member

    def add_channel(self, guild: FakeGuild, name: str, *, nsfw: bool = False) -> FakeChannel:
        channel = FakeChannel(
            self.new_id(), name, 0, guild.id, position=len(guild.channels), nsfw=nsfw
        )
        guild.channels[channel.id] = channel
        self.channels[channel.id] = channel
        return channel

    def dm_channel(self, user: FakeUser) -> FakeChannel:
        channel = self.dm_channels.get(user.id)
        if channel is None:
            channel = FakeChannel(self.new_id(), "", type=1, recipient_id=user.id)
            self.dm_channels[user.id] = channel
            self.channels[channel.id] = channel
        return channel

    def guild_of(self, channel: FakeChannel) -> FakeGuild | None:
        return None if channel.guild_id is None else self.guilds[channel.guild_id]

    def command_id(self, name: str, command_type: int) -> int:
        """A stable id per command, as Discord keeps one across bulk overwrites."""
        key = (name, command_type)
        if key not in self.command_ids:
            self.command_ids[key] = self.new_id()
        return self.command_ids[key]

    # ---- permissions ------------------------------------------------------------------------

    def guild_permissions(self, guild: FakeGuild, user_id: int) -> int:
        if user_id == guild.owner_id:
            return Perm.ALL
        member = guild.members.get(user_id)
        if member is None:
            return 0
        value = guild.everyone_role.permissions
        for role_id in member.role_ids:
            value |= guild.roles[role_id].permissions
        return Perm.ALL if value & Perm.ADMINISTRATOR else value

    def permissions_in(self, channel: FakeChannel, user_id: int) -> int:
        """Discord's algorithm: base role permissions, then @everyone, role, member overwrites."""
        guild = self.guild_of(channel)
        if guild is None:  # DMs
            return Perm.EVERYONE
        value = self.guild_permissions(guild, user_id)
        if value & Perm.ADMINISTRATOR:
            return Perm.ALL
        member = guild.members.get(user_id)
        role_ids = set(member.role_ids) if member else set()
        by_id = {(o.type, o.id): o for o in channel.overwrites}
        everyone = by_id.get((0, guild.id))
        if everyone:
            value = (value & ~everyone.deny) | everyone.allow
        allow = deny = 0
        for overwrite in channel.overwrites:
            if overwrite.type == 0 and overwrite.id in role_ids:
                allow |= overwrite.allow
                deny |= overwrite.deny
        value = (value & ~deny) | allow
        own = by_id.get((1, user_id))
        if own:
            value = (value & ~own.deny) | own.allow
        return value

    def deny(self, channel: FakeChannel, user_id: int, permissions: int) -> None:
        for overwrite in channel.overwrites:
            if overwrite.type == 1 and overwrite.id == user_id:
                overwrite.deny |= permissions
                overwrite.allow &= ~permissions
                return
        channel.overwrites.append(Overwrite(user_id, 1, deny=permissions))

    # ---- attachments ------------------------------------------------------------------------

    def store_attachment(
        self,
        channel_id: int,
        filename: str,
        data: bytes,
        *,
        content_type: str | None = None,
        ephemeral: bool = False,
    ) -> FakeAttachment:
        """Keep an upload and give it a CDN-like URL (signed query string included) that
        the fake serves."""
        filename = _clean_filename(filename)
        attachment_id = self.new_id()
        if content_type in (None, "application/octet-stream"):
            content_type = mimetypes.guess_type(filename)[0] or content_type
        path = f"/attachments/{channel_id}/{attachment_id}/{quote(filename)}"
        expires = int(time.time()) + 86400
        query = f"?ex={expires:x}&is={int(time.time()):x}&hm={secrets.token_hex(32)}&"
        width, height = _image_size(data, content_type)
        attachment = FakeAttachment(
            attachment_id,
            filename,
            data,
            content_type,
            url=f"{self.base_url}{path}{query}",
            proxy_url=f"{self.base_url}/proxy{path}{query}",
            width=width,
            height=height,
            ephemeral=ephemeral,
        )
        self.attachments[attachment_id] = attachment
        return attachment

    def _attachments_for(
        self,
        channel_id: int,
        data: dict[str, Any],
        files: list[UploadedFile],
        keep: list[FakeAttachment],
        ephemeral: bool,
    ) -> list[FakeAttachment]:
        """Resolve a body's `attachments` list: entries with a file index take the
        matching `files[n]` part, entries with an existing id keep that attachment."""
        by_index = {f.index: f for f in files}
        listed = data.get("attachments")
        if listed is None:
            entries: list[dict[str, Any]] = [{"id": str(a.id)} for a in keep]
            entries += [{"id": f.index} for f in files]
        else:
            entries = list(listed)
            referenced = {_as_int(e.get("id")) for e in entries}
            entries += [{"id": f.index} for f in files if f.index not in referenced]
        existing = {a.id: a for a in keep}
        result: list[FakeAttachment] = []
        for position, entry in enumerate(entries):
            ref = _as_int(entry.get("id"))
            if ref in existing:
                result.append(existing[ref])
            elif ref in by_index:
                upload = by_index[ref]
                result.append(
                    self.store_attachment(
                        channel_id,
                        entry.get("filename") or upload.filename,
                        upload.data,
                        content_type=upload.content_type,
                        ephemeral=ephemeral,
                    )
                )
            else:
                error = field_error("ATTACHMENT_NOT_FOUND", "Attachment data not found")
                raise invalid_form({"attachments": {str(position): error}})
        return result

    # ---- messages ---------------------------------------------------------------------------

    def add_message(self, message: FakeMessage, *, by_bot: bool) -> FakeMessage:
        self.messages_by_id[message.id] = message
        self.all_messages.append(message)
        if by_bot:
            self.bot_messages.append(message)
        channel = self.channels.get(message.channel_id)
        if channel is not None and not message.ephemeral:
            channel.last_message_id = message.id
        self.changed.notify()
        return message

    def create_bot_message(
        self,
        channel_id: int,
        data: dict[str, Any],
        files: list[UploadedFile],
        *,
        interaction_id: int | None = None,
        message_type: int = 0,
        extra_flags: int = 0,
    ) -> FakeMessage:
        """A message the bot sent: channel POST, interaction response or follow-up."""
        channel = self.channels[channel_id]
        flags = (int(data.get("flags") or 0) & SENDABLE_FLAGS) | extra_flags
        message = FakeMessage(
            id=self.new_id(),
            channel_id=channel_id,
            author_id=self.bot_user.id,
            guild_id=channel.guild_id,
            content=data.get("content") or "",
            embeds=_normalise_embeds(data.get("embeds")),
            components=_number_components(data.get("components")),
            flags=flags,
            type=message_type,
            interaction_id=interaction_id,
            webhook_id=self.application_id if interaction_id is not None else None,
        )
        message.attachments = self._attachments_for(
            channel_id, data, files, [], bool(flags & MessageFlag.EPHEMERAL)
        )
        self._apply_reference(message, data.get("message_reference"))
        message.mention_ids = self._mentions(message, data)
        if data.get("nonce") is not None:
            message.nonce = str(data["nonce"])
        self.add_message(message, by_bot=True)
        if self.hub is not None:
            self.hub.message_created(message)
        return message

    def edit_checked(
        self, message: FakeMessage, data: dict[str, Any], files: list[UploadedFile]
    ) -> FakeMessage:
        """An edit the bot asked for: refused as Discord would refuse it, else applied."""
        check_message(data, files, creating=False, existing_attachments=len(message.attachments))
        return self.edit_message(message, data, files)

    def edit_message(
        self, message: FakeMessage, data: dict[str, Any], files: list[UploadedFile]
    ) -> FakeMessage:
        """Apply a PATCH the way Discord does: only the fields sent change; a deferred
        response loses its loading state but keeps its ephemerality."""
        was_loading = message.loading
        previous = message.snapshot()
        if "content" in data:
            message.content = data["content"] or ""
        if "embeds" in data:
            message.embeds = _normalise_embeds(data["embeds"])
        if "components" in data:
            message.components = _number_components(data["components"])
        if "attachments" in data or files:
            message.attachments = self._attachments_for(
                message.channel_id, data, files, message.attachments, message.ephemeral
            )
        if "flags" in data and data["flags"] is not None:
            changeable = MessageFlag.SUPPRESS_EMBEDS
            message.flags = (message.flags & ~changeable) | (int(data["flags"]) & changeable)
        message.flags &= ~MessageFlag.LOADING
        if "content" in data:
            message.mention_ids = self._mentions(message, data)
        if not was_loading:
            message.edited_at = now()
        message.edits.append(previous)
        self.changed.notify()
        if self.hub is not None:
            self.hub.message_updated(message)
        return message

    def delete_message(self, message: FakeMessage) -> None:
        message.deleted = True
        self.changed.notify()
        if self.hub is not None:
            self.hub.message_deleted(message)

    def _apply_reference(self, message: FakeMessage, reference: dict[str, Any] | None) -> None:
        if not reference or reference.get("message_id") is None:
            return
        target_id = int(reference["message_id"])
        target = self.messages_by_id.get(target_id)
        if target is None or target.deleted:
            if reference.get("fail_if_not_exists", True):
                error = field_error("MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
                raise invalid_form({"message_reference": error})
            return
        message.reference = target.id
        message.reference_channel_id = target.channel_id
        message.type = 19  # REPLY

    def _mentions(self, message: FakeMessage, data: dict[str, Any]) -> list[int]:
        """Users pinged by the content, plus the replied-to author unless replied_user=false,
        as `allowed_mentions` lets them (absent: everything in the content pings). Sets
        `message.mention_everyone` for an @everyone or @here that is allowed to ping."""
        allowed = data.get("allowed_mentions")
        parse = ["users", "roles", "everyone"] if allowed is None else allowed.get("parse") or []
        allowed = allowed or {}
        named = {int(u) for u in allowed.get("users") or []}
        ids = [
            int(m)
            for m in USER_MENTION.findall(message.content)
            if int(m) in self.users and ("users" in parse or int(m) in named)
        ]
        message.mention_everyone = "everyone" in parse and bool(
            EVERYONE_MENTION.search(message.content)
        )
        if message.reference is not None and allowed.get("replied_user", True):
            target = self.messages_by_id[message.reference]
            if target.author_id not in ids and target.author_id != message.author_id:
                ids.append(target.author_id)
        return ids

    def visible_messages(self, channel_id: int) -> list[FakeMessage]:
        """What `GET /channels/{id}/messages` can see: not deleted, not ephemeral."""
        return [
            m
            for m in self.all_messages
            if m.channel_id == channel_id and not m.deleted and not m.ephemeral
        ]


def _as_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _clean_filename(name: str) -> str:
    """Discord keeps the base name and replaces characters it dislikes with underscores."""
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = re.sub(r"[^\w.\-]", "_", base)
    return cleaned or "unknown"


def _image_size(data: bytes, content_type: str | None) -> tuple[int | None, int | None]:
    if Image is None or not (content_type or "").startswith("image/"):
        return None, None
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width, image.height
    except Exception:
        return None, None


def _normalise_embeds(embeds: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    return [{"type": "rich", **embed} for embed in embeds or []]


def _number_components(components: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Discord gives every component without one a sequential numeric `id`."""
    counter = iter(range(1, 10_000))

    def walk(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        result = []
        for item in items:
            item = dict(item)
            item.setdefault("id", next(counter))
            if "components" in item:
                item["components"] = walk(item["components"])
            result.append(item)
        return result

    return walk(list(components or []))
