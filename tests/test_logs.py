"""Secrets never reach the log, even at debug level where discord.py logs webhook URLs; nor do
members' prompts, which /forget-me could not reach there, unless the owner sets LOG_PROMPTS."""

import json
import logging

import aiohttp
import pytest

from bot.logs import REDACTED, WITHHELD, configure_logging

TOKEN = "MTIzNDU2Nzg5MDEyMzQ1Njc4.GabcDE.very-secret-bot-token-value"
INTERACTION_TOKEN = "aW50ZXJhY3Rpb246MTIzNDU2Nzg5MDEyMzQ1Njc4OnNlY3JldA"


PROMPT = "a zebra-striped xylophone quintet"  # text no log line has otherwise
NEGATIVE = "qwertyuiop smudges"


@pytest.fixture(autouse=True)
def restored_logging():
    """configure_logging changes the root logger for the whole process: put it back."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("aiosqlite").level
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    logging.getLogger("aiosqlite").setLevel(saved[2])


def test_tokens_are_redacted_in_messages_arguments_and_tracebacks(capfd):
    configure_logging("DEBUG", [TOKEN], log_prompts=True)  # payloads in full: still no token
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


def test_discord_payloads_keep_their_event_but_not_what_members_typed(capfd):
    """Each kind of line discord.py logs at debug level, with what it really passes."""
    configure_logging("DEBUG", [TOKEN])
    option = {"name": "prompt", "type": 3, "value": PROMPT}
    event = {"op": 0, "t": "INTERACTION_CREATE", "s": 7, "d": {"data": {"options": [option]}}}
    logging.getLogger("discord.gateway").debug("For Shard ID %s: WebSocket Event: %s", 0, event)
    message = {"op": 0, "t": "MESSAGE_CREATE", "s": 8, "d": {"content": f"--no {NEGATIVE}"}}
    logging.getLogger("discord.gateway").debug("WebSocket Event: %s", message)  # one argument
    http = logging.getLogger("discord.http")
    body = json.dumps({"embeds": [{"description": PROMPT}]})
    http.debug("%s %s with %s has returned %s", "POST", "https://x/channels/1/messages", body, 200)
    http.debug("%s %s has received %s", "POST", "https://x/channels/9", {"content": PROMPT})
    form = aiohttp.FormData()
    form.add_field("payload_json", json.dumps({"content": PROMPT}))
    http.debug("%s %s with %s has returned %s", "POST", "https://x/webhooks/1/t", form, 200)
    logging.getLogger("discord.client").debug(["a list", PROMPT])  # a payload as the message
    err = capfd.readouterr().err
    assert PROMPT not in err and NEGATIVE not in err
    assert "'t': 'INTERACTION_CREATE', 's': 7" in err and "'t': 'MESSAGE_CREATE'" in err
    assert "POST https://x/channels/1/messages with [withheld" in err
    assert err.count(WITHHELD) == 6


@pytest.mark.parametrize("log_prompts", [False, True])
async def test_imagine_at_debug_level_logs_no_prompt_unless_the_owner_asks(
    discord_world, imagine_bot, capfd, log_prompts
):
    configure_logging("DEBUG", [discord_world.fake.token], log_prompts=log_prompts)
    inter = await imagine_bot.imagine(
        discord_world.alice, prompt=PROMPT, negative_prompt=NEGATIVE, seed=7
    )
    await inter.wait_followup(timeout=60)
    await imagine_bot.wait_idle()
    err = capfd.readouterr().err
    assert "INTERACTION_CREATE" in err  # discord.py did log the event at debug level...
    if log_prompts:
        assert PROMPT in err and NEGATIVE in err  # ...with what the member typed, if asked
    else:
        assert PROMPT not in err and NEGATIVE not in err  # ...and without it otherwise
        assert WITHHELD in err
    assert discord_world.fake.token not in err and inter.token not in err
