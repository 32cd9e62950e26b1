"""Reading the bot's answers: job numbers, embed fields and attachment names."""

from __future__ import annotations

import re

from fakediscord import FakeMessage

JOB_NUMBER = re.compile(r"job #(\d+)")


def job_id_of(text: str | None) -> int:
    """The N of "job #N" in a bot message."""
    found = JOB_NUMBER.search(text or "")
    if found is None:
        raise AssertionError(f"no job number in {text!r}")
    return int(found[1])


def embed_field(message: FakeMessage, name: str) -> str | None:
    """The value of the first embed's field `name`, or None."""
    embeds = message.embeds
    for item in embeds[0].get("fields", []) if embeds else []:
        if item["name"] == name:
            return item["value"]
    return None


def attachment_names(message: FakeMessage) -> list[str]:
    return [a.filename for a in message.attachments]
