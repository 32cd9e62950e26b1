"""REST routes about the application itself: registering its commands (bulk overwrite, global
or in one guild, with Discord's checks on names, descriptions and counts) and listing them,
and the guilds the bot is in with its permissions there."""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from . import payloads
from .bodies import BODY
from .rest import json_response, unknown
from .state import FakeState
from .validation import Refusal, field_error, invalid_form

CHAT_INPUT, USER, MESSAGE = 1, 2, 3
# Discord's limits: 100 slash commands, 5 user and 5 message context-menu commands.
MAX_COMMANDS = {CHAT_INPUT: 100, USER: 5, MESSAGE: 5}
MAX_OPTIONS = 25
SLASH_NAME = re.compile(r"^[-_'\w]{1,32}$")
SUB_COMMAND, SUB_COMMAND_GROUP = 1, 2


def _name_errors(name: Any, slash: bool) -> dict[str, Any] | None:
    if not isinstance(name, str) or not 1 <= len(name) <= 32:
        return field_error("BASE_TYPE_BAD_LENGTH", "Must be between 1 and 32 in length.")
    if slash and (not SLASH_NAME.match(name) or name != name.lower()):
        return field_error("APPLICATION_COMMAND_INVALID_NAME", "Command name is invalid")
    return None


def _description_errors(description: Any, slash: bool) -> dict[str, Any] | None:
    if slash and (not isinstance(description, str) or not 1 <= len(description) <= 100):
        return field_error("BASE_TYPE_BAD_LENGTH", "Must be between 1 and 100 in length.")
    if not slash and description not in (None, ""):
        return field_error(
            "APPLICATION_COMMAND_CONTEXT_MENU_DESCRIPTION",
            "Context menu commands cannot have description",
        )
    return None


def _option_errors(options: Any) -> dict[str, Any]:
    """Errors in an options list, keyed by index (as Discord nests them)."""
    if options is None:
        return {}
    if not isinstance(options, list) or len(options) > MAX_OPTIONS:
        return {"_errors": [{"code": "BASE_TYPE_MAX_LENGTH", "message": "Must be 25 or fewer."}]}
    errors: dict[str, Any] = {}
    optional_seen = False
    for index, option in enumerate(options):
        problems: dict[str, Any] = {}
        if (found := _name_errors(option.get("name"), True)) is not None:
            problems["name"] = found
        if (found := _description_errors(option.get("description"), True)) is not None:
            problems["description"] = found
        if option.get("type") in (SUB_COMMAND, SUB_COMMAND_GROUP):
            if nested := _option_errors(option.get("options")):
                problems["options"] = nested
        elif option.get("required"):
            if optional_seen:
                problems["required"] = field_error(
                    "APPLICATION_COMMAND_OPTIONS_REQUIRED_INVALID",
                    "Required options must be placed before non-required options",
                )
        else:
            optional_seen = True
        if problems:
            errors[str(index)] = problems
    return errors


def check_commands(commands: Any) -> None:
    """Raise Discord's 400 / 50035 for a bulk overwrite it would refuse."""
    if not isinstance(commands, list):
        raise invalid_form({"_errors": [{"code": "LIST_TYPE_CONVERT", "message": "Not a list."}]})
    errors: dict[str, Any] = {}
    seen: set[tuple[str, int]] = set()
    counts = dict.fromkeys(MAX_COMMANDS, 0)
    for index, command in enumerate(commands):
        kind = command.get("type", CHAT_INPUT)
        slash = kind == CHAT_INPUT
        problems: dict[str, Any] = {}
        if kind not in MAX_COMMANDS:
            problems["type"] = field_error("BASE_TYPE_CHOICES", "Value must be one of {1, 2, 3}.")
        if (found := _name_errors(command.get("name"), slash)) is not None:
            problems["name"] = found
        if (found := _description_errors(command.get("description"), slash)) is not None:
            problems["description"] = found
        if option_errors := _option_errors(command.get("options")):
            problems["options"] = option_errors
        key = (str(command.get("name")), kind)
        if key in seen:
            problems["name"] = field_error(
                "APPLICATION_COMMANDS_DUPLICATE_NAME", "Application command names must be unique"
            )
        seen.add(key)
        counts[kind] = counts.get(kind, 0) + 1
        if problems:
            errors[str(index)] = problems
    for kind, limit in MAX_COMMANDS.items():
        if counts[kind] > limit:
            errors.setdefault("_errors", []).append(
                {"code": "APPLICATION_COMMANDS_TOO_MANY", "message": f"Max {limit} of type {kind}"}
            )
    if errors:
        raise invalid_form(errors)


class ApplicationApi:
    def __init__(self, state: FakeState) -> None:
        self.state = state

    def routes(self) -> list[web.RouteDef]:
        global_path = "/applications/{application_id}/commands"
        guild_path = "/applications/{application_id}/guilds/{guild_id}/commands"
        return [
            web.get(global_path, self.list_commands),
            web.put(global_path, self.overwrite_commands),
            web.get(guild_path, self.list_commands),
            web.put(guild_path, self.overwrite_commands),
            web.get("/users/@me/guilds", self.my_guilds),
        ]

    def _scope(self, request: web.Request) -> int | None:
        """The guild id of a guild route (which the bot must be in), None for a global one."""
        if int(request.match_info["application_id"]) != self.state.application_id:
            raise Refusal(403, payloads.error(50001, "Missing Access"))
        raw = request.match_info.get("guild_id")
        if raw is None:
            return None
        guild = self.state.guilds.get(int(raw))
        if guild is None:
            raise unknown(10004, "Guild")
        if self.state.bot_user.id not in guild.members:
            raise Refusal(403, payloads.error(50001, "Missing Access"))
        return guild.id

    def _command(self, data: dict[str, Any], guild_id: int | None) -> dict[str, Any]:
        kind = data.get("type", CHAT_INPUT)
        command = {
            **data,
            "id": str(self.state.command_id(data["name"], kind)),
            "application_id": str(self.state.application_id),
            "version": str(self.state.new_id()),
            "type": kind,
            "description": data.get("description") or "",
            "default_member_permissions": data.get("default_member_permissions"),
            "nsfw": bool(data.get("nsfw", False)),
        }
        if guild_id is not None:
            command["guild_id"] = str(guild_id)
        return command

    async def list_commands(self, request: web.Request) -> web.Response:
        return json_response(self.state.commands.get(self._scope(request), []))

    async def overwrite_commands(self, request: web.Request) -> web.Response:
        guild_id = self._scope(request)
        commands = request[BODY].json
        check_commands(commands)
        registered = [self._command(data, guild_id) for data in commands]
        self.state.commands[guild_id] = registered
        return json_response(registered)

    async def my_guilds(self, request: web.Request) -> web.Response:
        bot_id = self.state.bot_user.id
        return json_response(
            [
                {
                    "id": str(guild.id),
                    "name": guild.name,
                    "icon": None,
                    "owner": guild.owner_id == bot_id,
                    "permissions": str(self.state.guild_permissions(guild, bot_id)),
                    "features": [],
                }
                for guild in self.state.guilds.values()
                if bot_id in guild.members
            ]
        )
