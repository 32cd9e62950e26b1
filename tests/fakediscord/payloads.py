"""Turn the fake's models into the JSON Discord sends (API v10): snowflakes as strings,
permissions as strings, every key discord.py reads present."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .models import (
    FakeAttachment,
    FakeChannel,
    FakeGuild,
    FakeMember,
    FakeMessage,
    FakeRole,
    FakeUser,
    iso,
)

if TYPE_CHECKING:
    from .state import FakeState


def error(code: int, message: str, errors: dict[str, Any] | None = None) -> dict[str, Any]:
    """Discord's error body, e.g. `{"code": 50013, "message": "Missing Permissions"}`."""
    body: dict[str, Any] = {"message": message, "code": code}
    if errors:
        body["errors"] = errors
    return body


def user(u: FakeUser) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": str(u.id),
        "username": u.username,
        "discriminator": u.discriminator,
        "global_name": u.global_name,
        "avatar": None,
        "avatar_decoration_data": None,
        "banner": None,
        "accent_color": None,
        "public_flags": 0,
        "flags": 0,
        "collectibles": None,
        "primary_guild": None,
    }
    if u.bot:
        payload["bot"] = True
    return payload


def current_user(u: FakeUser) -> dict[str, Any]:
    """`GET /users/@me` for a bot: the user plus the account fields."""
    return {**user(u), "verified": True, "mfa_enabled": False, "locale": "en-US", "email": None}


def member(
    m: FakeMember, *, with_user: bool = True, permissions: int | None = None
) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "roles": [str(r) for r in m.role_ids],
        "nick": None,
        "avatar": None,
        "banner": None,
        "joined_at": iso(m.joined_at),
        "premium_since": None,
        "deaf": False,
        "mute": False,
        "pending": False,
        "flags": 0,
        "communication_disabled_until": None,
        "unusual_dm_activity_until": None,
    }
    if with_user:
        payload["user"] = user(m.user)
    if permissions is not None:
        payload["permissions"] = str(permissions)
    return payload


def role(r: FakeRole) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": str(r.id),
        "name": r.name,
        "color": 0,
        "colors": {"primary_color": 0, "secondary_color": None, "tertiary_color": None},
        "hoist": False,
        "icon": None,
        "unicode_emoji": None,
        "position": r.position,
        "permissions": str(r.permissions),
        "managed": r.managed,
        "mentionable": False,
        "flags": 0,
    }
    if r.bot_id is not None:
        payload["tags"] = {"bot_id": str(r.bot_id)}
    return payload


def channel(
    state: FakeState, ch: FakeChannel, *, with_guild_id: bool = True, permissions: int | None = None
) -> dict[str, Any]:
    last = None if ch.last_message_id is None else str(ch.last_message_id)
    if ch.is_dm:
        recipient = state.users[ch.recipient_id] if ch.recipient_id else None
        return {
            "id": str(ch.id),
            "type": 1,
            "last_message_id": last,
            "flags": 0,
            "recipients": [user(recipient)] if recipient else [],
        }
    payload: dict[str, Any] = {
        "id": str(ch.id),
        "type": ch.type,
        "name": ch.name,
        "position": ch.position,
        "permission_overwrites": [
            {"id": str(o.id), "type": o.type, "allow": str(o.allow), "deny": str(o.deny)}
            for o in ch.overwrites
        ],
        "parent_id": None,
        "topic": None,
        "nsfw": ch.nsfw,
        "rate_limit_per_user": 0,
        "last_message_id": last,
        "flags": 0,
    }
    if with_guild_id:
        payload["guild_id"] = str(ch.guild_id)
    if permissions is not None:
        payload["permissions"] = str(permissions)
    return payload


def guild_create(state: FakeState, g: FakeGuild) -> dict[str, Any]:
    """The full GUILD_CREATE body; member_count equals the members sent, so discord.py
    considers the guild chunked and does not ask for members."""
    bot_member = g.members.get(state.bot_user.id)
    return {
        "id": str(g.id),
        "name": g.name,
        "icon": None,
        "splash": None,
        "discovery_splash": None,
        "banner": None,
        "description": None,
        "owner_id": str(g.owner_id),
        "afk_channel_id": None,
        "afk_timeout": 300,
        "verification_level": 0,
        "default_message_notifications": 0,
        "explicit_content_filter": 0,
        "mfa_level": 0,
        "nsfw_level": 0,
        "premium_tier": 0,
        "premium_subscription_count": 0,
        "premium_progress_bar_enabled": False,
        "preferred_locale": "en-US",
        "features": [],
        "application_id": None,
        "system_channel_id": str(g.default_channel_id),
        "system_channel_flags": 0,
        "rules_channel_id": None,
        "public_updates_channel_id": None,
        "safety_alerts_channel_id": None,
        "vanity_url_code": None,
        "max_members": 500000,
        "max_video_channel_users": 25,
        "max_stage_video_channel_users": 50,
        "incidents_data": None,
        "roles": [role(r) for r in g.roles.values()],
        "emojis": [],
        "stickers": [],
        "joined_at": iso(bot_member.joined_at if bot_member else g.created_at),
        "large": False,
        "lazy": True,
        "unavailable": False,
        "member_count": len(g.members),
        "members": [member(m) for m in g.members.values()],
        "channels": [channel(state, c, with_guild_id=False) for c in g.channels.values()],
        "threads": [],
        "presences": [],
        "voice_states": [],
        "stage_instances": [],
        "guild_scheduled_events": [],
        "soundboard_sounds": [],
        "embedded_activities": [],
    }


def attachment(a: FakeAttachment) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "id": str(a.id),
        "filename": a.filename,
        "size": a.size,
        "url": a.url,
        "proxy_url": a.proxy_url,
        "content_type": a.content_type,
        "flags": 0,
    }
    if a.width is not None and a.height is not None:
        payload["width"] = a.width
        payload["height"] = a.height
    if a.ephemeral:
        payload["ephemeral"] = True
    return payload


def message(
    state: FakeState, msg: FakeMessage, *, gateway: bool = False, with_referenced: bool = True
) -> dict[str, Any]:
    """A message object. Gateway events also carry `guild_id` and the author's `member`."""
    author = state.users[msg.author_id]
    payload: dict[str, Any] = {
        "id": str(msg.id),
        "channel_id": str(msg.channel_id),
        "type": msg.type,
        "author": user(author),
        "content": msg.content,
        "timestamp": iso(msg.created_at),
        "edited_timestamp": iso(msg.edited_at),
        "tts": False,
        "mention_everyone": msg.mention_everyone,
        "mentions": [user(state.users[uid]) for uid in msg.mention_ids if uid in state.users],
        "mention_roles": [],
        "mention_channels": [],
        "attachments": [attachment(a) for a in msg.attachments],
        "embeds": list(msg.embeds),
        "components": list(msg.components),
        "pinned": False,
        "flags": msg.flags,
    }
    if msg.nonce is not None:
        payload["nonce"] = msg.nonce
    if msg.webhook_id is not None:
        payload["webhook_id"] = str(msg.webhook_id)
        payload["application_id"] = str(state.application_id)
    if msg.interaction_id is not None and msg.interaction_id in state.interactions:
        payload.update(_interaction_metadata(state, msg))
    if msg.reference is not None:
        ref_channel = msg.reference_channel_id or msg.channel_id
        payload["message_reference"] = {
            "type": 0,
            "message_id": str(msg.reference),
            "channel_id": str(ref_channel),
            "fail_if_not_exists": True,
        }
        ref_guild = state.channels[ref_channel].guild_id if ref_channel in state.channels else None
        if ref_guild is not None:
            payload["message_reference"]["guild_id"] = str(ref_guild)
        if with_referenced:
            referenced = state.messages_by_id.get(msg.reference)
            payload["referenced_message"] = (
                None
                if referenced is None or referenced.deleted
                else message(state, referenced, with_referenced=False)
            )
    if gateway and msg.guild_id is not None:
        payload["guild_id"] = str(msg.guild_id)
        guild = state.guilds[msg.guild_id]
        author_member = guild.members.get(msg.author_id)
        if author_member is not None and msg.webhook_id is None:
            payload["member"] = member(author_member, with_user=False)
        for mentioned in payload["mentions"]:
            mentioned_member = guild.members.get(int(mentioned["id"]))
            if mentioned_member is not None:
                mentioned["member"] = member(mentioned_member, with_user=False)
    return payload


def _interaction_metadata(state: FakeState, msg: FakeMessage) -> dict[str, Any]:
    """`interaction_metadata` (and the deprecated `interaction`) for messages that answer one."""
    handle = state.interactions[msg.interaction_id or 0]
    owners = handle.payload["authorizing_integration_owners"]
    metadata: dict[str, Any] = {
        "id": str(handle.id),
        "type": handle.type,
        "user": user(handle.user),
        "authorizing_integration_owners": owners,
    }
    if handle.original_message_id is not None and handle.original_message_id != msg.id:
        metadata["original_response_message_id"] = str(handle.original_message_id)
    if handle.type == 3 and handle.message_id is not None:
        metadata["interacted_message_id"] = str(handle.message_id)
    legacy: dict[str, Any] = {
        "id": str(handle.id),
        "type": handle.type,
        "name": handle.name,
        "user": user(handle.user),
    }
    if handle.type == 2:
        metadata["name"] = handle.name
        metadata["command_type"] = handle.command_type
        if handle.target_id is not None:
            metadata["target_message_id"] = str(handle.target_id)
    return {"interaction_metadata": metadata, "interaction": legacy}
