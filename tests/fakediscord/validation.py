"""Discord's checks on message bodies, so a bot that would be refused by Discord is refused
here too (with the same status and error JSON)."""

from __future__ import annotations

from typing import Any

from . import payloads
from .bodies import UploadedFile

MAX_CONTENT = 2000
MAX_EMBEDS = 10
MAX_ATTACHMENTS = 10
MAX_EMBED_TOTAL = 6000
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # attachment_size_limit for a server without boosts
EMBED_LIMITS = {"title": 256, "description": 4096}
FIELD_LIMITS = {"name": 256, "value": 1024}
MAX_FIELDS = 25
MAX_ROWS = 5
MAX_ROW_ITEMS = 5
MAX_CUSTOM_ID = 100
MAX_LABEL = 80


class Refusal(Exception):
    """Raised with the HTTP status and error body Discord would answer.

    `bot_error` marks refusals that mean the bot did something Discord never accepts (bad
    body, late or double acknowledgement); by default 400 and 413 answers. A 403 for a
    channel the bot may not post in is part of normal life and is not one."""

    def __init__(self, status: int, body: dict[str, Any], *, bot_error: bool | None = None) -> None:
        super().__init__(body.get("message", ""))
        self.status = status
        self.body = body
        self.bot_error = status in (400, 413) if bot_error is None else bot_error


def field_error(code: str, message: str) -> dict[str, Any]:
    """One field's entry in an "Invalid Form Body" error tree."""
    return {"_errors": [{"code": code, "message": message}]}


def invalid_form(errors: dict[str, Any]) -> Refusal:
    """Discord's 400 / 50035 with the tree of what is wrong, e.g. {"content": field_error(…)}."""
    return Refusal(400, payloads.error(50035, "Invalid Form Body", errors))


def _too_long(limit: int) -> dict[str, Any]:
    return field_error("BASE_TYPE_MAX_LENGTH", f"Must be {limit} or fewer in length.")


def check_message(
    data: dict[str, Any],
    files: list[UploadedFile],
    *,
    creating: bool,
    existing_attachments: int = 0,
) -> None:
    """Raise `Refusal` if Discord would refuse this message body.

    `creating` adds the "Cannot send an empty message" check; `existing_attachments` counts
    attachments an edit keeps (when it does not list them)."""
    errors: dict[str, Any] = {}
    content = data.get("content")
    if isinstance(content, str) and len(content) > MAX_CONTENT:
        errors["content"] = _too_long(MAX_CONTENT)

    embeds = data.get("embeds") or []
    if len(embeds) > MAX_EMBEDS:
        errors["embeds"] = _too_long(MAX_EMBEDS)
    else:
        embed_errors = _check_embeds(embeds)
        if embed_errors:
            errors["embeds"] = embed_errors

    attachment_count = _attachment_count(data, files, existing_attachments)
    if attachment_count > MAX_ATTACHMENTS:
        errors["attachments"] = _too_long(MAX_ATTACHMENTS)

    component_errors = _check_components(data)
    if component_errors:
        errors["components"] = component_errors

    if errors:
        raise invalid_form(errors)

    if sum(len(f.data) for f in files) > MAX_UPLOAD_BYTES:
        raise Refusal(413, payloads.error(40005, "Request entity too large"))

    if creating and _is_empty(data, files):
        raise Refusal(400, payloads.error(50006, "Cannot send an empty message"))


def _attachment_count(data: dict[str, Any], files: list[UploadedFile], existing: int) -> int:
    listed = data.get("attachments")
    if listed is None:
        return existing + len(files)
    return max(len(listed), len(files))


def _is_empty(data: dict[str, Any], files: list[UploadedFile]) -> bool:
    return not (data.get("content") or data.get("embeds") or files or data.get("components"))


def _check_embeds(embeds: list[dict[str, Any]]) -> dict[str, Any]:
    errors: dict[str, Any] = {}
    total = 0
    for index, embed in enumerate(embeds):
        embed_errors: dict[str, Any] = {}
        for key, limit in EMBED_LIMITS.items():
            text = embed.get(key) or ""
            total += len(text)
            if len(text) > limit:
                embed_errors[key] = _too_long(limit)
        fields = embed.get("fields") or []
        if len(fields) > MAX_FIELDS:
            embed_errors["fields"] = _too_long(MAX_FIELDS)
        for field_index, embed_field in enumerate(fields):
            for key, limit in FIELD_LIMITS.items():
                text = embed_field.get(key) or ""
                total += len(text)
                if len(text) > limit:
                    embed_errors.setdefault("fields", {}).setdefault(str(field_index), {})[key] = (
                        _too_long(limit)
                    )
        total += len((embed.get("footer") or {}).get("text") or "")
        total += len((embed.get("author") or {}).get("name") or "")
        if embed_errors:
            errors[str(index)] = embed_errors
    if total > MAX_EMBED_TOTAL and not errors:
        errors["_errors"] = [
            {
                "code": "MAX_EMBED_SIZE_EXCEEDED",
                "message": f"Embed size exceeds maximum size of {MAX_EMBED_TOTAL}",
            }
        ]
    return errors


def _check_components(data: dict[str, Any]) -> dict[str, Any]:
    rows = data.get("components") or []
    if len(rows) > MAX_ROWS:
        return _too_long(MAX_ROWS)
    errors: dict[str, Any] = {}
    seen: set[str] = set()
    for row_index, row in enumerate(rows):
        children = row.get("components") or []
        if len(children) > MAX_ROW_ITEMS:
            errors[str(row_index)] = {"components": _too_long(MAX_ROW_ITEMS)}
            continue
        for item_index, item in enumerate(children):
            problem = _check_item(item, seen)
            if problem:
                errors.setdefault(str(row_index), {}).setdefault("components", {})[
                    str(item_index)
                ] = problem
    return errors


def _check_item(item: dict[str, Any], seen: set[str]) -> dict[str, Any]:
    problem: dict[str, Any] = {}
    custom_id = item.get("custom_id")
    if custom_id is not None:
        if len(custom_id) > MAX_CUSTOM_ID:
            problem["custom_id"] = _too_long(MAX_CUSTOM_ID)
        elif custom_id in seen:
            problem["custom_id"] = field_error(
                "COMPONENT_CUSTOM_ID_DUPLICATED", "Component custom id cannot be duplicated"
            )
        seen.add(custom_id)
    label = item.get("label")
    if label is not None and len(label) > MAX_LABEL:
        problem["label"] = _too_long(MAX_LABEL)
    return problem


MAX_CHOICES = 25
MAX_CHOICE_TEXT = 100  # a choice's name, and a string choice's value
STRING_OPTION, INTEGER_OPTION, NUMBER_OPTION = 3, 4, 10


def check_choices(data: dict[str, Any], option_type: int | None) -> None:
    """Raise `Refusal` for an autocomplete answer Discord would refuse: more than 25 choices,
    a name not 1 to 100 characters, a value of the wrong type for the option (or a string
    value over 100 characters)."""
    choices = data.get("choices")
    if not isinstance(choices, list):
        raise invalid_form({"data": {"choices": field_error("BASE_TYPE_REQUIRED", "Required")}})
    if len(choices) > MAX_CHOICES:
        raise invalid_form({"data": {"choices": _too_long(MAX_CHOICES)}})
    errors: dict[str, Any] = {}
    for index, choice in enumerate(choices):
        problem: dict[str, Any] = {}
        name, value = choice.get("name"), choice.get("value")
        if not isinstance(name, str) or not 1 <= len(name) <= MAX_CHOICE_TEXT:
            problem["name"] = field_error(
                "BASE_TYPE_BAD_LENGTH", f"Must be between 1 and {MAX_CHOICE_TEXT} in length."
            )
        if option_type == STRING_OPTION:
            if not isinstance(value, str):
                problem["value"] = field_error("BASE_TYPE_REQUIRED", "Must be a string.")
            elif len(value) > MAX_CHOICE_TEXT:
                problem["value"] = _too_long(MAX_CHOICE_TEXT)
        elif option_type in (INTEGER_OPTION, NUMBER_OPTION) and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            problem["value"] = field_error("NUMBER_TYPE_COERCE", "Value is not a number.")
        if problem:
            errors[str(index)] = problem
    if errors:
        raise invalid_form({"data": {"choices": errors}})
