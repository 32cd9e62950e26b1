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
    log.debug("WebSocket Event: %s", {"t": "INTERACTION_CREATE", "d": {"token": INTERACTION_TOKEN}})
    log.debug('raw: {"id": "1", "token": "%s", "type": 2}', INTERACTION_TOKEN)
    log.info("logging in using static token %s", TOKEN)
    try:
        raise RuntimeError(f"bad header Authorization: Bot {TOKEN}")
    except RuntimeError:
        log.exception("request failed")
    err = capfd.readouterr().err
    assert TOKEN not in err and INTERACTION_TOKEN not in err
    assert err.count(REDACTED) == 6
    assert "/webhooks/123/[redacted]/messages/@original" in err
    assert "RuntimeError: bad header Authorization: Bot [redacted]" in err


async def test_the_real_bot_at_debug_level_never_logs_a_token(fake_discord, model_cache, tmp_path):
    from harness.child_process import BotProcess
    from harness.in_process import build_world

    world = build_world(fake_discord)
    process = BotProcess.start(fake_discord, model_cache, tmp_path / "bot", LOG_LEVEL="DEBUG")
    try:
        await process.wait_ready(fake_discord)
        inter = await fake_discord.slash_command(
            world.alice, world.channel, "imagine", {"prompt": "a secret-free log", "seed": 1}
        )
        await inter.wait_followup(timeout=60)
        assert await process.stop(30) == 0
    finally:
        process.kill()
    log = process.log()
    assert "/webhooks/" in log  # discord.py did log the follow-up URL at debug level...
    assert fake_discord.token not in log  # ...but neither the bot token
    assert inter.token not in log  # nor the interaction token appears
    assert REDACTED in log
