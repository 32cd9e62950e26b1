"""Every way a request can enter the queue (slash, slash with an image, the dry run's Confirm,
the Vary and Reroll buttons, the Vary context menu, a reply mentioning the bot, and the same in
a DM) runs the same checks: a banned member, a blocked prompt, a spent quota and a full
per-member queue are refused on each, privately where Discord allows it, and nothing is stored
or charged."""

import sqlite3

import discord
import pytest
from harness.answers import job_id_of
from test_images import encode, noise

from bot.db import jobs

BLOCKED_PROMPT = "a forbidden castle"
UPLOAD = ("start.png", encode(noise(64, 64, seed=5), "PNG"))


def jobs_of(bot, member):
    with sqlite3.connect(bot.service.settings.database_path) as raw:
        return raw.execute(
            "SELECT COUNT(*) FROM jobs WHERE member_id = ?", (member.id,)
        ).fetchone()[0]


async def mod(w, *subcommands, **options):
    inter = await w.fake.slash_command(w.mod, w.channel, "mod", options, subcommands=subcommands)
    return (await inter.wait_response()).content


async def public_result(w, bot):
    """A result of the moderator's, posted in the channel, with BLOCKED_PROMPT as its prompt
    (the term is blocked only afterwards)."""
    inter = await bot.imagine(w.mod, prompt=BLOCKED_PROMPT, seed=3)
    job_id = job_id_of((await inter.wait_response()).content)
    result = await inter.wait_followup(timeout=30)
    await bot.wait_idle()
    return job_id, result


# ---- the paths: each returns the message the member reads in answer -------------------------


async def by_slash(w, bot, member, parent):
    inter = await bot.imagine(member, prompt=BLOCKED_PROMPT, seed=1)
    return await inter.wait_original()


async def by_slash_with_image(w, bot, member, parent):
    inter = await w.fake.slash_command(
        member, w.channel, "imagine", {"prompt": BLOCKED_PROMPT}, attachments={"image": UPLOAD}
    )
    return await inter.wait_original()


async def by_confirm(w, bot, member, parent):
    inter = await bot.imagine(member, prompt=BLOCKED_PROMPT, seed=1, preview=True)
    panel = await inter.wait_original()
    custom_id = panel.components[0]["components"][0]["custom_id"]
    return await (await w.fake.click_button(member, panel, custom_id)).wait_original()


async def by_vary_button(w, bot, member, parent):
    job_id, result = parent
    press = await w.fake.click_button(member, result, f"vary:{job_id}:0:subtle")
    return await press.wait_original()


async def by_reroll(w, bot, member, parent):
    job_id, result = parent
    return await (await w.fake.click_button(member, result, f"reroll:{job_id}")).wait_original()


async def by_context_menu(w, bot, member, parent):
    _, result = parent
    return await (await w.fake.message_command(member, w.channel, "Vary", result)).wait_original()


async def by_reply(w, bot, member, parent):
    _, result = parent
    mine = await w.fake.send_message(member, w.channel, BLOCKED_PROMPT, reply_to=result)
    return await w.fake.wait_for_message(lambda m: m.reference == mine.id)


async def by_dm_slash(w, bot, member, parent):
    dm = w.fake.dm_channel(member)
    inter = await w.fake.slash_command(member, dm, "imagine", {"prompt": BLOCKED_PROMPT})
    return await inter.wait_original()


async def by_dm_reply(w, bot, member, parent):
    dm = w.fake.dm_channel(member)
    mine = await w.fake.send_message(
        member, dm, BLOCKED_PROMPT, attachments=[UPLOAD], mentions_bot=True
    )
    return await w.fake.wait_for_message(lambda m: m.reference == mine.id)


PATHS = {
    "slash": by_slash,
    "slash with image": by_slash_with_image,
    "dry run Confirm": by_confirm,
    "Vary button": by_vary_button,
    "Reroll button": by_reroll,
    "Vary context menu": by_context_menu,
    "reply": by_reply,
    "DM slash": by_dm_slash,
    "DM reply": by_dm_reply,
}
PRIVATE = {"slash", "slash with image", "dry run Confirm", "Vary button", "Reroll button"}


async def ban(w, bot):
    await mod(w, "ban", member=w.alice, reason="spam")
    return "can't generate images"


async def block(w, bot):
    await mod(w, "blocklist", "add", term="forbidden")
    return "blocks"


async def spend_quota(w, bot):
    # One default image of the tests' tiny size costs 0.003 units; every path costs some.
    await mod(w, "quota", "set", member=w.alice, limit=0.003)
    await bot.queued_job(await bot.imagine(w.alice, prompt="my one image", seed=9))
    await bot.wait_idle()
    return "used 0.003 of your 0.003 units"


async def fill_queue(w, bot):
    """Alice's three jobs (MAX_QUEUED_PER_MEMBER's default) wait behind a held call."""
    bot.runner.hold()
    for seed in (11, 12, 13):
        await bot.queued_job(await bot.imagine(w.alice, prompt="one of three", seed=seed))
    return "You have 3 jobs queued or running; the limit is 3"


REFUSALS = {
    "banned": ban,
    "blocked prompt": block,
    "quota spent": spend_quota,
    "queue full": fill_queue,
}


@pytest.mark.parametrize("path", sorted(PATHS))
@pytest.mark.parametrize("refusal", sorted(REFUSALS))
async def test_every_admission_path_refuses(discord_world, imagine_bot, path, refusal):
    w = discord_world
    parent = await public_result(w, imagine_bot)
    expected = await REFUSALS[refusal](w, imagine_bot)
    before = jobs_of(imagine_bot, w.alice)
    answer = await PATHS[path](w, imagine_bot, w.alice, parent)
    if path.startswith("DM"):
        expected = "only in servers"
    assert expected in answer.content, answer.content
    assert "job #" not in answer.content
    if path in PRIVATE:
        assert answer.ephemeral
    assert jobs_of(imagine_bot, w.alice) == before
    imagine_bot.runner.release()
    await imagine_bot.wait_idle()
    assert jobs_of(imagine_bot, w.alice) == before
    assert not w.fake.problems()


async def test_commands_that_admit_are_guild_only(imagine_bot):
    tree = imagine_bot.bot.tree
    menu = tree.get_command("Vary", type=discord.AppCommandType.message)
    for command in (tree.get_command("imagine"), menu):
        assert command.guild_only, command.name
        assert command.allowed_contexts.guild and not command.allowed_contexts.private_channel


async def test_a_dm_result_buttons_answer_to_the_jobs_server(discord_world, imagine_bot):
    """A result delivered by DM keeps its buttons; pressing them there is judged by the job's
    server (a ban there holds), not by "server 0"."""
    w = discord_world
    w.fake.deny_send(w.channel)
    inter = await imagine_bot.imagine(w.alice, prompt="a lamp", seed=2)
    record = await imagine_bot.queued_job(inter)
    imagine_bot.bot.status_board.forget(record.job.id)  # as after a restart: no follow-up
    await imagine_bot.wait_idle()
    dm = w.fake.dm_channel(w.alice)
    result = await w.fake.wait_for_message(lambda m: m.channel_id == dm.id and m.attachments)
    await mod(w, "ban", member=w.alice, reason="spam")
    press = await w.fake.click_button(w.alice, result, f"reroll:{record.job.id}")
    refused = await press.wait_original()
    assert "can't generate images" in refused.content
    assert await imagine_bot.store.read(jobs.count) == 1
