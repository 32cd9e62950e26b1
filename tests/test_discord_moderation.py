"""Quotas, bans, the queue, stats, the blocklist, audit and a member's own commands, driven
through the real discord.py client against the fake Discord."""

import sqlite3

import pytest
from test_images import encode, noise

from bot.db import jobs, members

MOD_COMMANDS = [
    (("quota", "show"), "member"),
    (("quota", "set"), "member+limit"),
    (("quota", "reset"), "member"),
    (("quota", "default"), "limit"),
    (("ban",), "member"),
    (("unban",), "member"),
    (("queue", "list"), None),
    (("queue", "clear"), None),
    (("stats",), None),
    (("audit",), None),
    (("blocklist", "add"), "term"),
    (("blocklist", "remove"), "term"),
    (("blocklist", "list"), None),
]


def mod_options(kind, target):
    return {
        None: {},
        "member": {"member": target},
        "limit": {"limit": 3},
        "member+limit": {"member": target, "limit": 3},
        "term": {"term": "nsfw"},
    }[kind]


async def mod(world, who, *subcommands, **options):
    return await world.fake.slash_command(
        who, world.channel, "mod", options, subcommands=subcommands
    )


def audit_rows(bot):
    with sqlite3.connect(bot.service.settings.database_path) as raw:
        return raw.execute(
            "SELECT moderator_id, action, target_id FROM audit ORDER BY id"
        ).fetchall()


@pytest.mark.parametrize(("subcommands", "kind"), MOD_COMMANDS)
async def test_members_without_manage_server_are_refused_every_mod_command(
    discord_world, imagine_bot, subcommands, kind
):
    # The fake sends the member's real permissions and no default_member_permissions, as a
    # server that let everyone see /mod would: our own check must still refuse.
    inter = await mod(
        discord_world, discord_world.alice, *subcommands, **mod_options(kind, discord_world.bob)
    )
    response = await inter.wait_response()
    assert response.ephemeral
    assert "Manage Server" in response.content
    assert audit_rows(imagine_bot) == []


# 128×128 at 20 steps: 1/16 of the pixels and 4/5 of the steps of a unit, 0.05 units an image.
FOX = {"prompt": "a fox", "width": 128, "height": 128, "steps": 20}


async def test_moderator_sets_a_quota_that_then_holds_and_is_audited(discord_world, imagine_bot):
    w = discord_world
    set_to = await mod(w, w.mod, "quota", "set", member=w.alice, limit=0.1)
    response = await set_to.wait_response()
    assert response.ephemeral and "0.1 units a day" in response.content
    assert audit_rows(imagine_bot) == [(w.mod.id, "quota set", w.alice.id)]

    first = await imagine_bot.imagine(w.alice, seed=1, count=2, **FOX)
    await imagine_bot.queued_job(first)
    jobs_before = await imagine_bot.store.read(jobs.count)
    refused = await (await imagine_bot.imagine(w.alice, seed=3, **FOX)).wait_response()
    assert refused.ephemeral
    assert "used 0.1 of your 0.1 units in the last 24 hours" in refused.content
    assert "1 image × 128×128 × 20 steps = 0.05 units" in refused.content
    assert "<t:" in refused.content
    assert await imagine_bot.store.read(jobs.count) == jobs_before

    shown = await (await mod(w, w.mod, "quota", "show", member=w.alice)).wait_response()
    assert "0.1 units in the last 24 hours; limit: 0.1 units a day" in shown.content
    own = await (await w.fake.slash_command(w.alice, w.channel, "quota")).wait_response()
    assert own.ephemeral and "used 0.1 of your 0.1 units" in own.content
    assert "0 units left" in own.content

    await (await mod(w, w.mod, "quota", "reset", member=w.alice)).wait_response()
    again = await imagine_bot.imagine(w.alice, seed=5, **FOX)
    assert (await imagine_bot.queued_job(again)).job.request.seed == 5


async def test_server_default_quota(discord_world, imagine_bot):
    w = discord_world
    await (await mod(w, w.mod, "quota", "default", limit=0.05)).wait_response()
    await imagine_bot.queued_job(await imagine_bot.imagine(w.bob, seed=1, **FOX))
    refused = await (await imagine_bot.imagine(w.bob, seed=2, **FOX)).wait_response()
    assert refused.ephemeral and "of your 0.05 units" in refused.content


async def test_ban_cancels_queued_jobs_and_refuses_politely(
    discord_world, imagine_bot, held_runner
):
    w = discord_world
    held_runner.hold()
    running = await imagine_bot.queued_job(await imagine_bot.imagine(w.bob, prompt="x", seed=1))
    await held_runner.wait_calls(1)
    queued = await imagine_bot.queued_job(
        await imagine_bot.imagine(w.alice, prompt="y", seed=2, width=128)
    )
    listing = await (await mod(w, w.mod, "queue", "list")).wait_response()
    assert f"running #{running.job.id}" in listing.content
    assert f"1. #{queued.job.id} <@{w.alice.id}>" in listing.content

    banned = await (await mod(w, w.mod, "ban", member=w.alice, reason="spam")).wait_response()
    assert "Cancelled and refunded 1 queued job(s)" in banned.content
    assert (await imagine_bot.store.read(jobs.get, queued.job.id)).job.status == "cancelled"
    refused = await (await imagine_bot.imagine(w.alice, prompt="z", seed=3)).wait_response()
    assert (
        refused.ephemeral
        and "can't generate images" in refused.content
        and "spam" in refused.content
    )

    await (await mod(w, w.mod, "unban", member=w.alice)).wait_response()
    await imagine_bot.queued_job(await imagine_bot.imagine(w.alice, prompt="z", seed=3))
    cleared = await (await mod(w, w.mod, "queue", "clear", member=w.alice)).wait_response()
    assert "Cancelled and refunded 1 of" in cleared.content
    held_runner.release()
    await imagine_bot.wait_idle()
    actions = [action for _, action, _ in audit_rows(imagine_bot)]
    assert actions == ["ban", "unban", "queue clear"]
    log = await (await mod(w, w.mod, "audit")).wait_response()
    assert "**ban**" in log.content and "**queue clear**" in log.content


async def test_blocklist_catches_evasions_and_lets_near_misses_through(discord_world, imagine_bot):
    w = discord_world
    added = await (await mod(w, w.mod, "blocklist", "add", term="nsfw")).wait_response()
    assert "Blocked `nsfw`" in added.content
    for prompt in ("an N.S.F.W poster", "ｎｓｆｗ art"):
        refused = await (await imagine_bot.imagine(w.alice, prompt=prompt, seed=1)).wait_response()
        assert refused.ephemeral and "blocks" in refused.content, prompt
    fine = await imagine_bot.imagine(w.alice, prompt="news from the swamp", seed=1)
    await imagine_bot.queued_job(fine)
    listed = await (await mod(w, w.mod, "blocklist", "list")).wait_response()
    assert "`nsfw`" in listed.content
    await (await mod(w, w.mod, "blocklist", "remove", term="NSFW")).wait_response()
    await imagine_bot.queued_job(await imagine_bot.imagine(w.alice, prompt="nsfw", seed=2))


async def test_stats_report_images_members_and_busy_time(discord_world, imagine_bot):
    w = discord_world
    for member, seed in ((w.alice, 1), (w.alice, 2), (w.bob, 3)):
        await imagine_bot.queued_job(await imagine_bot.imagine(member, prompt="p", seed=seed))
    await imagine_bot.wait_idle()
    stats = await (await mod(w, w.mod, "stats")).wait_response()
    assert "Images: 3 in the last 24 hours, 3 in 7 days." in stats.content
    assert f"<@{w.alice.id}> (2), <@{w.bob.id}> (1)" in stats.content
    assert "busy" in stats.content


async def test_history_lists_own_jobs_with_links(discord_world, imagine_bot):
    w = discord_world
    inter = await imagine_bot.imagine(w.alice, prompt="a lighthouse", seed=77)
    record = await imagine_bot.queued_job(inter)
    followup = await inter.wait_followup()
    await imagine_bot.wait_idle()
    history = await (await w.fake.slash_command(w.alice, w.channel, "history")).wait_response()
    assert history.ephemeral
    assert f"#{record.job.id}" in history.content and "seed 77" in history.content
    assert "a lighthouse" in history.content and str(followup.id) in history.content
    other = await (await w.fake.slash_command(w.bob, w.channel, "history")).wait_response()
    assert "no jobs yet" in other.content


async def test_forget_me_needs_the_owners_confirmation(discord_world, imagine_bot):
    w = discord_world
    inter = await imagine_bot.imagine(w.alice, prompt="secret-giraffe-prompt", seed=1)
    await imagine_bot.queued_job(inter)
    await imagine_bot.wait_idle()
    asked = await w.fake.slash_command(w.alice, w.channel, "forget-me")
    prompt_message = await asked.wait_response()
    assert prompt_message.ephemeral
    message = await asked.original()
    custom_id = f"forget-me:{w.alice.id}"
    stranger = await w.fake.click_button(w.bob, message, custom_id)
    assert "belongs to someone else" in (await stranger.wait_response()).content
    assert await imagine_bot.store.read(members.history, w.alice.id) != []
    confirmed = await w.fake.click_button(w.alice, message, custom_id)
    assert "deleted 1 job(s)" in (await confirmed.wait_response()).content
    assert await imagine_bot.store.read(members.history, w.alice.id) == []


async def test_forget_me_scrubs_derived_jobs_and_uploads(discord_world, imagine_bot):
    """Bob's Vary of alice's result copied her prompt: it goes with her data (his job stays,
    blank); his reply with his own words keeps them. Her upload goes too; nothing of hers is
    left in the database file."""
    w = discord_world
    secret = "secret-giraffe-prompt"
    upload = encode(noise(64, 64, seed=4), "PNG")
    inter = await w.fake.slash_command(
        w.alice,
        w.channel,
        "imagine",
        {"prompt": secret, "seed": 1},
        attachments={"image": ("me.png", upload)},
    )
    await inter.wait_original()
    result = await inter.wait_followup(timeout=30)
    parent = await imagine_bot.store.read(members.history, w.alice.id)
    parent_id = parent[0].job.id
    vary = await w.fake.click_button(w.bob, result, f"vary:{parent_id}:0:subtle")
    await vary.wait_original()
    own = await w.fake.send_message(w.bob, w.channel, "bob's own words", reply_to=result)
    await w.fake.wait_for_message(lambda m: m.reference == own.id and "job #" in m.content)
    await imagine_bot.wait_idle()

    asked = await w.fake.slash_command(w.alice, w.channel, "forget-me")
    await asked.wait_response()
    confirmed = await w.fake.click_button(
        w.alice, await asked.original(), f"forget-me:{w.alice.id}"
    )
    assert "deleted 1 job(s)" in (await confirmed.wait_response()).content
    with sqlite3.connect(imagine_bot.service.settings.database_path) as raw:
        left = raw.execute(
            "SELECT member_id, prompt, parent_job_id, init_image_hash FROM jobs ORDER BY id"
        ).fetchall()
        uploads = {row[0] for row in raw.execute("SELECT hash FROM init_images")}
    assert [(m, p, parent) for m, p, parent, _ in left] == [
        (w.bob.id, "", None),
        (w.bob.id, "bob's own words", None),
    ]
    assert uploads == {h for *_, h in left}  # only bob's jobs' images remain
    stored = imagine_bot.service.settings.database_path
    for path in (stored, stored.with_name(stored.name + "-wal")):
        if path.exists():
            assert secret.encode() not in path.read_bytes(), path
