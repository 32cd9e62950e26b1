"""Secrets never reach the log, even at debug level where discord.py logs webhook URLs."""

import logging

from bot.logs import REDACTED, configure_logging

TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GabcDE.very-secret-bot-token-value"
INTERACTION_TOKEN = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5MDEyMzQ1Njc4OnNlY3JldA"


def test_tokens_are_redacted_in_messages_arguments_and_tracebacks(capfd):
    configure_logging("DEBUG", [TOKEN])
    log = logging.getLogger("discord.webhook.async_")
    log.debug(
        "Webhook ID 123 with POST https://discord.com/api/v10/webhooks/123/%s/messages/@original",
        INTERACTION_TOKEN,
    )
    log.debug("POST /api/v10/interactions/987654321/%s/callback", INTERACTION_TOKEN)
    log.info("logging in using static token %s", TOKEN)
    try:
        raise RuntimeError(f"bad header Authorization: Bot {TOKEN}")
    except RuntimeError:
        log.exception("request failed")
    err = capfd.readouterr().err
    assert TOKEN not in err and INTERACTION_TOKEN not in err
    assert err.count(REDACTED) == 4
    assert "/webhooks/123/[redacted]/messages/@original" in err
    assert "RuntimeError: bad header Authorization: Bot [redacted]" in err
