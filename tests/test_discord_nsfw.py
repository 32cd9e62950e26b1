"""Age-restricted channels, through the fake Discord. A model the owner marks `nsfw = true` is
refused outside age-restricted channels (nothing queued or charged, on every admission path)
and not offered there by autocomplete or /models. With NSFW_CHANNELS=allow, an image the
safety checker flags is posted as a spoiler in an age-restricted channel and withheld and
refunded elsewhere; with the default `withhold`, it is withheld everywhere."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from typing import Any

import discord
import pytest
from harness.answers import attachment_names, job_id_of
from harness.in_process import HeldRunner, allowlist_file, allowlist_runner, held_bot

from bot.db import jobs
from bot.models import ModelsFileError, load_catalog
from bot.settings import SettingsError, load_settings
from cogs.models import age_restricted

MODELS_TOML = """
default = "tiny"

[models.tiny]
source = "tiny"
description = "SD 1.x at toy size"

[models.tiny-adult]
source = "tiny"
description = "the same toy model, for age-restricted channels"
nsfw = true
"""

REFUSED = "tiny-adult works only in age-restricted channels; here choose one of: tiny."


@pytest.fixture(scope="module")
def models_file(tmp_path_factory):
    return allowlist_file(tmp_path_factory.mktemp("allowlist"), MODELS_TOML)


@pytest.fixture(scope="module")
def nsfw_runner(model_cache, models_file):
    """The real runner on the allowlist, both names loaded once for the module."""
    return allowlist_runner(model_cache, models_file, ("tiny", "tiny-adult"))


class FlaggingRunner(HeldRunner):
    """Every image comes back flagged by the safety checker with its pixels kept, as the
    real runner hands them over with NSFW_CHANNELS=allow (`PipelineOptions.keep_flagged`)."""

    def generate(self, *args: Any, **kwargs: Any) -> list[Any]:
        images = super().generate(*args, **kwargs)
        return [dataclasses.replace(image, withheld=True) for image in images]


@pytest.fixture
def adult(discord_world):
    """An age-restricted text channel beside #general."""
    return discord_world.fake.add_channel(discord_world.guild, "adult", age_restricted=True)


@pytest.fixture
async def nsfw_bot(discord_world, settings, models_file, nsfw_runner, adult, request):
    """The bot on the allowlist, its runner behind a gate. Parametrized (indirectly) with an
    NSFW_CHANNELS value, its runner flags every image."""
    chosen = getattr(request, "param", None)
    runner = (HeldRunner if chosen is None else FlaggingRunner)(nsfw_runner)
    settings = replace(settings, models_file=models_file, nsfw_channels=chosen or "withhold")
    async with held_bot(discord_world.fake, settings, runner) as running:
        yield running


async def refusal(inter) -> str:
    response = await inter.wait_response()
    assert response.type == 4 and response.ephemeral
    return response.content


async def test_an_nsfw_model_is_refused_in_an_ordinary_channel_and_works_in_an_age_restricted_one(
    discord_world, nsfw_bot, adult
):
    w = discord_world
    for options in ({}, {"preview": True}):  # the dry run says it too
        inter = await nsfw_bot.imagine(w.alice, prompt="a cat", model="tiny-adult", **options)
        text = await refusal(inter)
        assert f"`model`: {REFUSED}" in text and "Nothing was queued" in text

    inter = await nsfw_bot.imagine(w.alice, adult, prompt="a cat", model="tiny-adult", steps=2)
    record = await nsfw_bot.queued_job(inter)
    result = await inter.wait_followup(timeout=30)
    await nsfw_bot.wait_idle()
    assert record.job.request.model == "tiny-adult" and result.channel_id == adult.id
    assert attachment_names(result) == [f"seed-{record.job.request.seed}.png"]

    # A reply in #general asking for it is refused too, and pings nobody.
    _, general_result = await result_in(nsfw_bot, w, w.channel, model="tiny")
    asked = await w.fake.send_message(
        w.bob, w.channel, "a dog --model tiny-adult", reply_to=general_result
    )
    answer = await w.fake.wait_for_message(lambda m: m.reference == asked.id)
    assert REFUSED in answer.content and "Nothing was queued" in answer.content
    assert await nsfw_bot.store.read(jobs.count) == 2
    assert [key.model for key, _ in nsfw_bot.runner.calls] == ["tiny-adult", "tiny"]


async def result_in(bot, w, channel, **options):
    """/imagine as Alice in `channel`; (its job, the result message)."""
    inter = await bot.imagine(w.alice, channel, prompt="a cat", seed=3, steps=2, **options)
    record = await bot.queued_job(inter)
    result = await inter.wait_followup(timeout=30)
    await bot.wait_idle()
    return record, result


async def dm_result(bot, w, channel, **options):
    """/imagine as Alice in `channel`, closed to the bot, delivered after the follow-up window
    (as after a restart): (its job, the messages the bot sent her by DM)."""
    w.fake.deny_send(channel)
    bot.runner.hold()
    inter = await bot.imagine(w.alice, channel, prompt="a cat", steps=2, **options)
    record = await bot.queued_job(inter)
    bot.bot.status_board.forget(record.job.id)  # no follow-up: the channel, then a DM
    bot.runner.release()
    await bot.wait_idle()
    dm = w.fake.dm_channel(w.alice)
    sent = [
        m for m in w.fake.messages if m.channel_id == dm.id and f"#{record.job.id}" in m.content
    ]
    w.fake.rejected.clear()  # the bot's refused post in the closed channel
    return await bot.store.read(jobs.get, record.job.id), sent


async def test_an_nsfw_models_result_never_goes_by_dm_and_a_dm_is_not_age_restricted(
    discord_world, nsfw_bot, adult
):
    """A result that would fall back to a DM (its channel closed to the bot) is not sent there
    for an nsfw model: it fails, refunded. And a button pressed in a DM asking for it is
    refused: a DM is not age-restricted."""
    w = discord_world
    record, sent = await dm_result(nsfw_bot, w, adult, model="tiny-adult")
    assert record.job.status == "failed" and "age-restricted channel" in record.error
    assert [m.attachments for m in sent] == [[]]  # only the notice that it failed
    assert "refunded" in sent[0].content
    assert (await nsfw_bot.service.quota(w.guild.id, w.alice.id)).used == 0

    # Its Reroll pressed in a DM (a button the bot would not post there) is refused.
    made, _ = await result_in(
        nsfw_bot, w, w.fake.add_channel(w.guild, "adult-2", age_restricted=True), model="tiny-adult"
    )
    planted = w.fake.plant_bot_message(
        w.fake.dm_channel(w.alice), f"job #{made.job.id}", [f"reroll:{made.job.id}"]
    )
    press = await w.fake.click_button(w.alice, planted, f"reroll:{made.job.id}")
    assert REFUSED in (await press.wait_original()).content
    assert await nsfw_bot.store.read(jobs.count) == 2


async def test_autocomplete_and_models_offer_an_nsfw_model_only_in_an_age_restricted_channel(
    discord_world, nsfw_bot, adult
):
    w = discord_world

    async def offered(command, channel, options):
        inter = await w.fake.autocomplete(w.alice, channel, command, options, "model")
        return [choice["value"] for choice in await inter.wait_choices()]

    for command, options in (("imagine", {"prompt": "a cat"}), ("settings", {})):
        options = {**options, "model": "tiny"}
        assert await offered(command, w.channel, options) == ["tiny"]
        assert await offered(command, adult, options) == ["tiny", "tiny-adult"]

    async def listed(channel):
        inter = await w.fake.slash_command(w.alice, channel, "models")
        return (await inter.wait_response()).content

    assert "tiny-adult" not in await listed(w.channel)
    assert "• **tiny-adult** — the same toy model, for age-restricted channels" in await listed(
        adult
    )


@pytest.mark.parametrize("nsfw_bot", ["allow"], indirect=True)
async def test_with_allow_a_flagged_image_is_a_spoiler_in_an_age_restricted_channel_only(
    discord_world, nsfw_bot, adult
):
    w, bot = discord_world, nsfw_bot
    record, shown = await result_in(bot, w, adult, count=2)
    seeds = record.job.request.seeds
    assert attachment_names(shown) == [
        "SPOILER_grid.png",
        *(f"SPOILER_seed-{seed}.png" for seed in seeds),
    ]
    assert "2 of 2 image(s) flagged by the safety checker, as spoilers." in shown.content
    assert "withheld" not in shown.content
    done = await bot.store.read(jobs.get, record.job.id)
    assert (done.job.status, done.withheld) == ("done", 0)
    charged = (await bot.service.quota(w.guild.id, w.alice.id)).used
    assert charged == pytest.approx(record.job.request.cost)

    # Vary finds its image under the spoiler's name.
    press = await w.fake.click_button(w.bob, shown, f"vary:{record.job.id}:1:strong")
    varied = await bot.store.read(jobs.get, job_id_of((await press.wait_original()).content))
    assert varied.job.parent_job_id == record.job.id
    await bot.wait_idle()

    withheld, hidden = await result_in(bot, w, w.channel, count=2)
    assert hidden.attachments == []
    assert "2 of 2 image(s) withheld by the safety checker." in hidden.content
    assert "They were refunded." in hidden.content
    done = await bot.store.read(jobs.get, withheld.job.id)
    assert (done.job.status, done.withheld) == ("done", 2)
    assert (await bot.service.quota(w.guild.id, w.alice.id)).used == pytest.approx(charged)


@pytest.mark.parametrize("nsfw_bot", ["allow"], indirect=True)
async def test_the_age_restriction_is_read_when_the_result_is_delivered(
    discord_world, nsfw_bot, adult
):
    """A moderator who lifts the channel's age restriction while the job waits sees its
    flagged image withheld: the channel as it is at delivery decides."""
    w, bot = discord_world, nsfw_bot
    bot.runner.hold()
    inter = await bot.imagine(w.alice, adult, prompt="a cat", steps=2)
    record = await bot.queued_job(inter)
    await bot.runner.wait_calls(1)
    w.fake.set_age_restricted(adult, False)
    bot.runner.release()
    result = await inter.wait_followup(timeout=30)
    await bot.wait_idle()
    assert result.attachments == [] and "withheld by the safety checker" in result.content
    assert (await bot.store.read(jobs.get, record.job.id)).withheld == 1


@pytest.mark.parametrize("nsfw_bot", ["withhold"], indirect=True)
async def test_by_default_a_flagged_image_is_withheld_even_in_an_age_restricted_channel(
    discord_world, nsfw_bot, adult
):
    w, bot = discord_world, nsfw_bot
    record, result = await result_in(bot, w, adult)
    assert result.attachments == [] and "They were refunded." in result.content
    assert (await bot.store.read(jobs.get, record.job.id)).withheld == 1
    assert (await bot.service.quota(w.guild.id, w.alice.id)).used == 0


async def test_a_thread_is_age_restricted_as_its_parent_channel_and_a_dm_is_not(
    discord_world, nsfw_bot, adult
):
    """discord.py's own objects as the bot holds them: a thread inherits its parent's flag
    (unknown parent: not restricted); a DM and a partial channel are not restricted."""
    client = nsfw_bot.bot
    guild = client.get_guild(discord_world.guild.id)
    assert age_restricted(guild.get_channel(adult.id))
    assert not age_restricted(guild.get_channel(discord_world.channel.id))

    def thread(parent_id: int) -> discord.Thread:
        data = {
            "id": "1",
            "guild_id": str(guild.id),
            "parent_id": str(parent_id),
            "owner_id": "2",
            "name": "a thread",
            "type": 11,
            "last_message_id": None,
            "rate_limit_per_user": 0,
            "message_count": 0,
            "member_count": 1,
            "thread_metadata": {
                "archived": False,
                "auto_archive_duration": 60,
                "archive_timestamp": "2024-01-01T00:00:00+00:00",
            },
        }
        return discord.Thread(guild=guild, state=client._connection, data=data)

    assert age_restricted(thread(adult.id))
    assert not age_restricted(thread(discord_world.channel.id))
    assert not age_restricted(thread(12345))  # a parent the bot does not know
    dm = await client.create_dm(discord.Object(discord_world.alice.id))
    assert isinstance(dm, discord.DMChannel) and not age_restricted(dm)
    assert not age_restricted(client.get_partial_messageable(adult.id))
    assert not age_restricted(None)


def test_nsfw_in_models_toml_is_checked_strictly(tmp_path):
    path = tmp_path / "models.toml"
    path.write_text(MODELS_TOML.replace("nsfw = true", 'nsfw = "yes"'))
    with pytest.raises(ModelsFileError, match=r"`models.tiny-adult.nsfw` must be true or false"):
        load_catalog(path, "tiny")
    path.write_text(MODELS_TOML)
    catalog = load_catalog(path, "tiny")
    assert (catalog.models["tiny"].nsfw, catalog.models["tiny-adult"].nsfw) == (False, True)


def test_nsfw_channels_is_withhold_or_allow():
    assert load_settings({}, None, require_token=False).nsfw_channels == "withhold"
    allowed = load_settings({"NSFW_CHANNELS": "allow"}, None, require_token=False)
    assert allowed.nsfw_channels == "allow"
    with pytest.raises(SettingsError, match="NSFW_CHANNELS must be one of withhold, allow"):
        load_settings({"NSFW_CHANNELS": "spoiler"}, None, require_token=False)
