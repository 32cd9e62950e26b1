"""Logging that never writes a secret, and no member text unless the owner asks for it.

Secrets: the bot token and interaction/webhook tokens (which discord.py puts in the URLs it logs
at debug level) are replaced before any handler sees them. Member text: discord.py logs every
gateway event and REST body at debug level, and with them what members type (prompts, negative
prompts, message content, option values), which `/forget-me` cannot reach once it is in a log
file; those arguments are withheld unless LOG_PROMPTS=true. The bot's own log lines name jobs
and members by id, never by what they typed.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

# Interaction and webhook tokens sit in URL paths: /interactions/<id>/<token>/callback,
# /webhooks/<application id>/<token>[/messages/...].
_URL_TOKENS = re.compile(r"(/(?:interactions|webhooks)/\d+/)([A-Za-z0-9_.\-]{20,})")
# ...and in gateway payloads discord.py logs at debug level: {'token': '...'} or "token": "...".
_FIELD_TOKENS = re.compile(r"""(['"]token['"]\s*:\s*['"])([^'"]+)""")
REDACTED = "[redacted]"
WITHHELD = "[withheld: may hold member text; LOG_PROMPTS=true logs it]"


class RedactSecrets(logging.Filter):
    def __init__(self, secrets: list[str]) -> None:
        super().__init__()
        self._secrets = [s for s in secrets if s]

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        text = _URL_TOKENS.sub(rf"\1{REDACTED}", text)
        return _FIELD_TOKENS.sub(rf"\1{REDACTED}", text)

    def filter(self, record: logging.LogRecord) -> bool:
        # Render once, redact, and freeze the result so formatters cannot bring it back.
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = self.redact(message), None
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        return True


def _summary(value: Any) -> Any:
    """An argument of a discord.py log line without what a member may have typed: numbers and
    plain text (methods, URLs, event names) stay; a gateway event keeps its op, type and
    sequence; JSON text, parsed JSON, form bodies and anything else are withheld."""
    if value is None or isinstance(value, int | float):
        return value
    if isinstance(value, str):
        return WITHHELD if value.lstrip()[:1] in ("{", "[") else value
    if isinstance(value, Mapping) and "op" in value:
        return {"op": value.get("op"), "t": value.get("t"), "s": value.get("s"), "d": WITHHELD}
    return WITHHELD


class WithholdMemberText(logging.Filter):
    """Keeps member text out of discord.py's log lines (`discord` and its child loggers): every
    argument goes through `_summary` before the line is rendered. discord.py formats its lines
    with arguments, never into the message itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != "discord" and not record.name.startswith("discord."):
            return True
        if not isinstance(record.msg, str):
            record.msg, record.args = WITHHELD, None
        elif isinstance(record.args, Mapping):
            # One mapping argument: named fields (`%(op)s`), or the payload itself (`%s`).
            if "%(" in record.msg:
                record.args = {key: _summary(value) for key, value in record.args.items()}
            else:
                record.args = (_summary(record.args),)
        elif record.args:
            record.args = tuple(_summary(value) for value in record.args)
        return True


def configure_logging(level: str, secrets: list[str], *, log_prompts: bool = False) -> None:
    """One handler on stderr for the whole process: secrets redacted always, member text
    withheld from discord.py's lines unless `log_prompts` (LOG_PROMPTS=true)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    if not log_prompts:
        handler.addFilter(WithholdMemberText())  # before RedactSecrets renders the line
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosqlite logs every statement with its parameters (prompts included) at debug level.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))
