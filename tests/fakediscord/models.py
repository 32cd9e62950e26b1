"""The fake's world: users, guilds, channels, messages and interactions as plain dataclasses.

Kept free of any JSON so that tests can inspect them directly; `payloads.py` turns them into
what Discord would send.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import time
from dataclasses import dataclass, field
from typing import Any

DISCORD_EPOCH_MS = 1_420_070_400_000
USER_MENTION = re.compile(r"<@!?(\d+)>")
EVERYONE_MENTION = re.compile(r"@(?:everyone|here)\b")


class Perm:
    """The permission bits the fake computes with (Discord's values)."""

    CREATE_INSTANT_INVITE = 1 << 0
    KICK_MEMBERS = 1 << 1
    ADMINISTRATOR = 1 << 3
    MANAGE_CHANNELS = 1 << 4
    MANAGE_GUILD = 1 << 5
    ADD_REACTIONS = 1 << 6
    VIEW_CHANNEL = 1 << 10
    SEND_MESSAGES = 1 << 11
    MANAGE_MESSAGES = 1 << 13
    EMBED_LINKS = 1 << 14
    ATTACH_FILES = 1 << 15
    READ_MESSAGE_HISTORY = 1 << 16
    MENTION_EVERYONE = 1 << 17
    USE_EXTERNAL_EMOJIS = 1 << 18
    CHANGE_NICKNAME = 1 << 26
    USE_APPLICATION_COMMANDS = 1 << 31
    SEND_MESSAGES_IN_THREADS = 1 << 38
    ALL = (1 << 51) - 1

    EVERYONE = (
        CREATE_INSTANT_INVITE
        | ADD_REACTIONS
        | VIEW_CHANNEL
        | SEND_MESSAGES
        | EMBED_LINKS
        | ATTACH_FILES
        | READ_MESSAGE_HISTORY
        | USE_EXTERNAL_EMOJIS
        | CHANGE_NICKNAME
        | USE_APPLICATION_COMMANDS
        | SEND_MESSAGES_IN_THREADS
    )
    MODERATOR = MANAGE_GUILD | MANAGE_MESSAGES | KICK_MEMBERS | MENTION_EVERYONE
    BOT = EVERYONE | MANAGE_MESSAGES


class AppFlag:
    """Application flags (`GET /oauth2/applications/@me`, READY): which privileged intents the
    developer portal has switched on. DEFAULT is a typical unverified bot's ("limited")."""

    GATEWAY_GUILD_MEMBERS_LIMITED = 1 << 15
    GATEWAY_MESSAGE_CONTENT = 1 << 18
    GATEWAY_MESSAGE_CONTENT_LIMITED = 1 << 19
    APPLICATION_COMMAND_BADGE = 1 << 23
    DEFAULT = (
        GATEWAY_MESSAGE_CONTENT_LIMITED | GATEWAY_GUILD_MEMBERS_LIMITED | APPLICATION_COMMAND_BADGE
    )


class MessageFlag:
    SUPPRESS_EMBEDS = 1 << 2
    EPHEMERAL = 1 << 6
    LOADING = 1 << 7
    SUPPRESS_NOTIFICATIONS = 1 << 12


class Snowflakes:
    """Issues real-looking, strictly increasing snowflakes, so that discord.py's
    `snowflake_time` (used e.g. to pick a delete rate-limit bucket) gives sane answers."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        candidate = (int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22 | (1 << 17) | (1 << 12)
        self._last = max(candidate, self._last + 1)
        return self._last


def iso(when: dt.datetime | None) -> str | None:
    """Discord's timestamp format (ISO 8601 with microseconds and +00:00)."""
    return None if when is None else when.astimezone(dt.UTC).isoformat()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass
class FakeUser:
    id: int
    username: str
    global_name: str | None = None
    bot: bool = False
    discriminator: str = "0"

    @property
    def mention(self) -> str:
        return f"<@{self.id}>"


@dataclass
class FakeRole:
    id: int
    name: str
    permissions: int
    position: int = 0
    managed: bool = False
    bot_id: int | None = None


@dataclass
class Overwrite:
    """A channel permission overwrite: `type` 0 targets a role, 1 a member."""

    id: int
    type: int
    allow: int = 0
    deny: int = 0


@dataclass
class FakeChannel:
    id: int
    name: str
    type: int = 0  # 0 guild text, 1 DM
    guild_id: int | None = None
    position: int = 0
    overwrites: list[Overwrite] = field(default_factory=list)
    recipient_id: int | None = None  # DMs only
    last_message_id: int | None = None
    nsfw: bool = False  # age-restricted (guild channels only)

    @property
    def is_dm(self) -> bool:
        return self.type == 1


@dataclass
class FakeMember:
    user: FakeUser
    guild_id: int
    role_ids: list[int] = field(default_factory=list)
    joined_at: dt.datetime = field(default_factory=now)

    @property
    def id(self) -> int:
        return self.user.id

    @property
    def mention(self) -> str:
        return self.user.mention


@dataclass
class FakeGuild:
    id: int
    name: str
    owner_id: int
    roles: dict[int, FakeRole] = field(default_factory=dict)
    channels: dict[int, FakeChannel] = field(default_factory=dict)
    members: dict[int, FakeMember] = field(default_factory=dict)
    default_channel_id: int = 0
    moderator_role_id: int = 0
    created_at: dt.datetime = field(default_factory=now)

    @property
    def channel(self) -> FakeChannel:
        """The #general text channel every fake guild starts with."""
        return self.channels[self.default_channel_id]

    @property
    def everyone_role(self) -> FakeRole:
        return self.roles[self.id]


@dataclass
class FakeAttachment:
    """An uploaded file, as stored by the fake and served back from `url`."""

    id: int
    filename: str
    data: bytes
    content_type: str | None
    url: str
    proxy_url: str
    width: int | None = None
    height: int | None = None
    ephemeral: bool = False

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class FakeMessage:
    """A message in the fake, whoever sent it. Bot-sent ones are also in `FakeDiscord.messages`."""

    id: int
    channel_id: int
    author_id: int
    guild_id: int | None = None
    content: str = ""
    embeds: list[dict[str, Any]] = field(default_factory=list)
    components: list[dict[str, Any]] = field(default_factory=list)
    flags: int = 0
    attachments: list[FakeAttachment] = field(default_factory=list)
    reference: int | None = None  # id of the replied-to message
    reference_channel_id: int | None = None
    interaction_id: int | None = None
    nonce: str | None = None
    type: int = 0
    mention_ids: list[int] = field(default_factory=list)
    mention_everyone: bool = False  # @everyone or @here pinged the channel
    webhook_id: int | None = None
    created_at: dt.datetime = field(default_factory=now)
    edited_at: dt.datetime | None = None
    deleted: bool = False
    at: float = field(default_factory=time.monotonic)
    edits: list[FakeMessage] = field(default_factory=list)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & MessageFlag.EPHEMERAL)

    @property
    def loading(self) -> bool:
        """A deferred ("is thinking…") original response nobody has filled in yet."""
        return bool(self.flags & MessageFlag.LOADING)

    def snapshot(self) -> FakeMessage:
        """A frozen copy of the current version, kept in `edits` before each change."""
        return dataclasses.replace(
            self,
            embeds=list(self.embeds),
            components=list(self.components),
            attachments=list(self.attachments),
            mention_ids=list(self.mention_ids),
            edits=[],
        )

    def find_component(self, custom_id: str) -> dict[str, Any] | None:
        """The component in this message's action rows with this custom_id."""
        items = (item for row in self.components for item in row.get("components", []))
        return next((item for item in items if item.get("custom_id") == custom_id), None)


@dataclass
class InteractionCallback:
    """One `POST /interactions/{id}/{token}/callback` the bot made, as it arrived."""

    type: int
    data: dict[str, Any]
    at: float
    message_id: int | None = None

    @property
    def flags(self) -> int:
        return int(self.data.get("flags") or 0)

    @property
    def ephemeral(self) -> bool:
        return bool(self.flags & MessageFlag.EPHEMERAL)

    @property
    def content(self) -> str | None:
        return self.data.get("content")

    @property
    def components(self) -> list[dict[str, Any]]:
        return list(self.data.get("components") or [])


@dataclass
class RecordedRequest:
    """One HTTP request the bot made to the fake."""

    method: str
    path: str  # relative to the API base, e.g. /channels/123/messages
    body: Any
    at: float
    status: int = 0


@dataclass
class Rejection:
    """A request the fake refused the way Discord would (body too big, late ack, …)."""

    method: str
    path: str
    status: int
    error: dict[str, Any]
