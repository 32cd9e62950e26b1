"""Logging that never writes a secret: the bot token and interaction/webhook tokens (which
discord.py puts in the URLs it logs at debug level) are replaced before any handler sees them."""

from __future__ import annotations

import logging
import re
import sys

# Interaction and webhook tokens sit in URL paths: /interactions/<id>/<token>/callback,
# /webhooks/<application id>/<token>[/messages/...].
_URL_TOKENS = re.compile(r"(/(?:interactions|webhooks)/\d+/)([A-Za-z0-9_.\-]{20,})")
# ...and in gateway payloads discord.py logs at debug level: {'token': '...'} or "token": "...".
_FIELD_TOKENS = re.compile(r"""(['"]token['"]\s*:\s*['"])([^'"]+)""")
REDACTED = "[redacted]"


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


def configure_logging(level: str, secrets: list[str]) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiosqlite logs every statement with its parameters (prompts included) at debug level.
    logging.getLogger("aiosqlite").setLevel(max(logging.INFO, root.level))
