"""Vary and Reroll buttons, replies to and with images, the Vary context menu and /imagine's
image option, driven through the real discord.py client against the fake Discord."""

import io
import sqlite3
from dataclasses import replace

import numpy as np
import pytest
from factories import make_request, pixels
from harness.answers import job_id_of
from harness.in_process import running_bot
from PIL import Image
from test_images import encode, noise, png_claiming

from bot.db import jobs
from bot.images import parameters_text, png_bytes


def vary_ids(message):
    return [c["custom_id"] for row in message.components for c in row["components"]]


def job_rows(bot):
    with sqlite3.connect(bot.service.settings.database_path) as raw:
        return raw.execute(
            "SELECT id, mode, strength, parent_job_id, parent_image_index, init_image_hash,"
            " prompt, seed FROM jobs ORDER BY id"
        ).fetchall()


async def result_of(bot, member, **options):
    """Run /imagine and return (job id, the result message)."""
    inter = await bot.imagine(member, **options)
    job_id = job_id_of((await inter.wait_response()).content)
    return job_id, await inter.wait_followup(timeout=30)


async def new_job_from(response_or_message, bot):
    job_id = job_id_of(response_or_message.content)
    await bot.wait_idle()
    return await bot.store.read(jobs.get, job_id)


async def test_result_buttons_vary_each_image_and_reroll(discord_world, imagine_bot):
    w = discord_world
    parent_id, result = await result_of(imagine_bot, w.alice, prompt="a harbour", seed=10, count=2)
    ids = vary_ids(result)
    assert ids == [
        f"vary:{parent_id}:0:subtle",
        f"vary:{parent_id}:0:strong",
        f"tools:{parent_id}:0",
        f"vary:{parent_id}:1:subtle",
        f"vary:{parent_id}:1:strong",
        f"tools:{parent_id}:1",
        f"reroll:{parent_id}",
    ]
    press = await w.fake.click_button(w.bob, result, f"vary:{parent_id}:1:strong")
    varied = await new_job_from(await press.wait_original(), imagine_bot)
    request = varied.job.request
    assert (request.mode, request.strength, request.prompt) == ("image", 0.75, "a harbour")
    assert (varied.job.parent_job_id, varied.job.parent_image_index) == (parent_id, 1)
    assert varied.job.member_id == w.bob.id and request.init_image_hash
    image = (await press.wait_followup()).attachments[0]
    parent_png = next(a for a in result.attachments if a.filename == "seed-11.png")
    assert pixels(image).shape == pixels(parent_png).shape
    assert np.abs(pixels(image) - pixels(parent_png)).mean() > 1

    subtle = await w.fake.click_button(w.alice, result, f"vary:{parent_id}:0:subtle")
    assert (
        await new_job_from(await subtle.wait_original(), imagine_bot)
    ).job.request.strength == 0.35

    reroll = await w.fake.click_button(w.alice, result, f"reroll:{parent_id}")
    rerolled = await new_job_from(await reroll.wait_response(), imagine_bot)
    assert rerolled.job.request.mode == "text" and rerolled.job.request.count == 2
    assert rerolled.job.request.seed != 10 and rerolled.job.request.prompt == "a harbour"


async def test_buttons_work_after_a_restart(discord_world, settings, tiny_runner):
    w = discord_world
    async with running_bot(w.fake, settings, runner=tiny_runner) as bot:
        parent_id, result = await result_of(bot, w.alice, prompt="a mill", seed=3)
    identified = len(w.fake.identifies)
    async with running_bot(w.fake, settings, runner=tiny_runner) as bot:
        await w.fake.wait_until(lambda: len(w.fake.identifies) > identified or None)
        press = await w.fake.click_button(w.alice, result, f"vary:{parent_id}:0:subtle")
        varied = await new_job_from(await press.wait_original(), bot)
        assert varied.job.parent_job_id == parent_id
        assert (await press.wait_followup()).attachments[0].filename.endswith(".png")


async def test_reply_to_a_result_with_a_new_prompt_and_options(discord_world, imagine_bot):
    w = discord_world
    parent_id, result = await result_of(imagine_bot, w.alice, prompt="a barn", seed=5)
    mine = await w.fake.send_message(
        w.alice, w.channel, "a red barn in snow --strength 0.5 --seed 7", reply_to=result
    )
    status = await w.fake.wait_for_message(
        lambda m: m.reference == mine.id and "job #" in m.content
    )
    record = await new_job_from(status, imagine_bot)
    request = record.job.request
    assert (request.prompt, request.strength, request.seed) == ("a red barn in snow", 0.5, 7)
    assert record.job.parent_job_id == parent_id
    delivered = await w.fake.wait_for_message(
        lambda m: m.reference == mine.id and m.attachments, timeout=30
    )
    assert delivered.attachments[0].filename == "seed-7.png"


async def test_reply_dot_dot_reuses_the_prompt(discord_world, imagine_bot):
    w = discord_world
    _, result = await result_of(imagine_bot, w.alice, prompt="a quiet lake", seed=5)
    mine = await w.fake.send_message(w.bob, w.channel, "..", reply_to=result)
    status = await w.fake.wait_for_message(
        lambda m: m.reference == mine.id and "job #" in m.content
    )
    record = await new_job_from(status, imagine_bot)
    assert record.job.request.prompt == "a quiet lake" and record.job.member_id == w.bob.id


async def test_mention_with_an_attached_image(discord_world, imagine_bot):
    w = discord_world
    upload = encode(noise(96, 64, seed=1), "JPEG")
    mine = await w.fake.send_message(
        w.alice,
        w.channel,
        "a watercolour fox",
        attachments=[("fox.jpg", upload)],
        mentions_bot=True,
    )
    status = await w.fake.wait_for_message(
        lambda m: m.reference == mine.id and "job #" in m.content
    )
    record = await new_job_from(status, imagine_bot)
    assert record.job.request.prompt == "a watercolour fox" and record.job.request.mode == "image"
    assert record.job.parent_job_id is None


async def test_a_reply_to_a_members_image_without_mention_is_left_alone(discord_world, imagine_bot):
    w = discord_world
    theirs = await w.fake.send_message(
        w.bob, w.channel, "my cat", attachments=[("cat.png", encode(noise(64, 64), "PNG"))]
    )
    await w.fake.send_message(w.alice, w.channel, "cute", reply_to=theirs, mentions_bot=False)
    mentioned = await w.fake.send_message(
        w.alice,
        w.channel,
        f"<@{w.fake.bot_user_id}> a cat astronaut",
        reply_to=theirs,
        mentions_bot=True,
    )
    status = await w.fake.wait_for_message(lambda m: m.reference == mentioned.id)
    record = await new_job_from(status, imagine_bot)
    assert record.job.request.prompt == "a cat astronaut"
    assert len(job_rows(imagine_bot)) == 1


async def test_context_menu_reuses_png_parameters(discord_world, imagine_bot):
    w = discord_world
    foreign = make_request(
        prompt="a neon city",
        negative_prompt="fog",
        seed=99,
        steps=9,
        guidance=5.5,
        width=64,
        height=64,
        scheduler="Euler a",
        model="other-model",
    )
    upload = png_bytes(noise(64, 64, seed=2), parameters_text(foreign, 99))
    theirs = await w.fake.send_message(w.bob, w.channel, "", attachments=[("city.png", upload)])
    menu = await w.fake.message_command(w.alice, w.channel, "Vary", theirs)
    record = await new_job_from(await menu.wait_original(), imagine_bot)
    request = record.job.request
    assert (request.prompt, request.negative_prompt, request.steps) == ("a neon city", "fog", 9)
    assert (request.guidance, request.scheduler, request.mode) == (5.5, "Euler a", "image")
    assert request.seed != 99


async def test_context_menu_on_our_result_keeps_the_lineage(discord_world, imagine_bot):
    w = discord_world
    parent_id, result = await result_of(imagine_bot, w.alice, prompt="a kite", seed=1)
    menu = await w.fake.message_command(w.bob, w.channel, "Vary", result)
    record = await new_job_from(await menu.wait_original(), imagine_bot)
    assert record.job.parent_job_id == parent_id and record.job.request.prompt == "a kite"
    plain = await w.fake.send_message(w.bob, w.channel, "no image here")
    refused = await (await w.fake.message_command(w.bob, w.channel, "Vary", plain)).wait_response()
    assert refused.ephemeral and "no image" in refused.content


async def test_imagine_with_an_image_and_strength(discord_world, imagine_bot):
    w = discord_world
    upload = encode(noise(128, 64, seed=3), "PNG")
    inter = await w.fake.slash_command(
        w.alice,
        w.channel,
        "imagine",
        {"prompt": "a desert", "seed": 4, "strength": 0.8},
        attachments={"image": ("desert.png", upload)},
    )
    record = await new_job_from(await inter.wait_original(), imagine_bot)
    request = record.job.request
    assert (request.mode, request.strength, request.seed) == ("image", 0.8, 4)
    assert request.width % 8 == 0 and request.width > request.height  # aspect kept
    bad = await w.fake.slash_command(
        w.alice, w.channel, "imagine", {"prompt": "x", "strength": 0.8}
    )
    assert "only applies with an image" in (await bad.wait_response()).content


async def test_the_same_seed_and_strength_give_the_same_pixels_alone_and_batched(
    discord_world, imagine_bot, held_runner
):
    w = discord_world
    _, result = await result_of(imagine_bot, w.alice, prompt="a lighthouse", seed=2)

    async def reply(member, seed):
        message = await w.fake.send_message(
            member, w.channel, f"a stormy lighthouse --seed {seed} --strength 0.5", reply_to=result
        )
        return await w.fake.wait_for_message(
            lambda m: m.reference == message.id and m.attachments, timeout=30
        )

    alone = await reply(w.alice, 5)
    held_runner.hold()
    calls_before = len(held_runner.calls)
    blocker = await imagine_bot.imagine(w.mod, prompt="blocker", seed=1, width=128)
    await blocker.wait_response()
    await held_runner.wait_calls(calls_before + 1)
    pending = [
        await w.fake.send_message(
            m, w.channel, f"a stormy lighthouse --seed {s} --strength 0.5", reply_to=result
        )
        for m, s in ((w.bob, 6), (w.alice, 5), (w.mod, 8))
    ]
    for message in pending:
        await w.fake.wait_for_message(
            lambda m, i=message.id: m.reference == i and "job #" in m.content
        )
    held_runner.release()
    await imagine_bot.wait_idle()
    batched = await w.fake.wait_for_message(
        lambda m: m.reference == pending[1].id and m.attachments
    )
    assert len(held_runner.calls[-1][1]) == 3  # the three variations shared one call
    assert np.abs(pixels(alone.attachments[0]) - pixels(batched.attachments[0])).max() <= 1


HOSTILE = {
    "huge.png": (png_claiming(20000, 20000), "pixels"),
    "notes.png": (b"these are my notes, not a picture\n" * 10, "not an image we accept"),
    "cut.jpg": (encode(noise(128, 128), "JPEG")[:600], "could not be read"),
    "tiny.png": (encode(noise(1, 1), "PNG"), "at least 64"),
}


def animated_gif():
    frames = [noise(64, 64, seed=i) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


HOSTILE["dance.gif"] = (animated_gif(), "not an image we accept")


@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_hostile_uploads_are_refused_and_cost_nothing(discord_world, imagine_bot, name):
    data, message = HOSTILE[name]
    inter = await discord_world.fake.slash_command(
        discord_world.alice,
        discord_world.channel,
        "imagine",
        {"prompt": "x"},
        attachments={"image": (name, data)},
    )
    refused = await inter.wait_original()
    assert (
        refused.ephemeral and message in refused.content and "Nothing was queued" in refused.content
    )
    assert job_rows(imagine_bot) == []


async def test_an_upload_over_the_size_limit_is_refused_before_download(
    discord_world, settings, tiny_runner
):
    small = replace(settings, max_upload_bytes=20_000)
    async with running_bot(discord_world.fake, small, runner=tiny_runner) as bot:
        big = encode(noise(256, 256), "PNG")
        assert len(big) > 20_000
        inter = await discord_world.fake.slash_command(
            discord_world.alice,
            discord_world.channel,
            "imagine",
            {"prompt": "x"},
            attachments={"image": ("big.png", big)},
        )
        refused = await inter.wait_response()
        assert "the limit is" in refused.content and job_rows(bot) == []
        downloads = [r for r in discord_world.fake.requests if r.path.startswith("/attachments/")]
        assert downloads == []


async def test_cmyk_and_rotated_uploads_are_accepted_upright(discord_world, imagine_bot):
    w = discord_world
    cmyk = encode(noise(64, 96).convert("CMYK"), "JPEG")
    rotated_source = noise(128, 64)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    rotated = encode(rotated_source, "JPEG", exif=exif.tobytes())
    sizes = []
    for name, data in (("cmyk.jpg", cmyk), ("rotated.jpg", rotated)):
        inter = await w.fake.slash_command(
            w.alice,
            w.channel,
            "imagine",
            {"prompt": "x", "seed": 1},
            attachments={"image": (name, data)},
        )
        record = await new_job_from(await inter.wait_original(), imagine_bot)
        sizes.append((record.job.request.width, record.job.request.height))
    assert sizes[0][1] > sizes[0][0]  # 64×96 stays portrait
    assert sizes[1][1] > sizes[1][0]  # 128×64 turned upright by its EXIF orientation


# ---- who may press what (issue 13) -----------------------------------------------------------


async def settings_private(w, member):
    inter = await w.fake.slash_command(member, w.channel, "settings", {"private": True})
    assert "privately" in (await inter.wait_response()).content


async def test_reroll_honours_the_members_private_delivery(discord_world, imagine_bot):
    w = discord_world
    await settings_private(w, w.alice)
    parent_id, result = await result_of(imagine_bot, w.alice, prompt="my secret garden", seed=8)
    assert result.ephemeral
    reroll = await w.fake.click_button(w.alice, result, f"reroll:{parent_id}")
    status = await reroll.wait_original()
    assert status.ephemeral and "job #" in status.content
    rerolled = await new_job_from(status, imagine_bot)
    delivered = await reroll.wait_followup(timeout=30)
    assert delivered.ephemeral and delivered.attachments
    assert rerolled.job.request.prompt == "my secret garden"
    public = [m for m in w.fake.messages if not m.ephemeral and m.channel_id == w.channel.id]
    assert not any("secret garden" in str(m.embeds) or "job #" in m.content for m in public)


@pytest.mark.parametrize("kind", ["reroll", "vary"])
async def test_a_forged_id_cannot_reuse_another_members_job(discord_world, imagine_bot, kind):
    w = discord_world
    await settings_private(w, w.alice)
    hidden_id, _ = await result_of(imagine_bot, w.alice, prompt="alice's hidden idea", seed=1)
    _, mine = await result_of(imagine_bot, w.bob, prompt="bob's own", seed=1)
    custom_id = f"reroll:{hidden_id}" if kind == "reroll" else f"vary:{hidden_id}:0:subtle"
    press = await w.fake.click_button(w.bob, mine, custom_id, forged=True)
    refused = await press.wait_original()
    assert refused.ephemeral and "not one I made" in refused.content
    assert [row[6] for row in job_rows(imagine_bot)] == ["alice's hidden idea", "bob's own"]


async def test_reroll_of_a_job_from_someone_elses_upload_is_theirs_only(discord_world, imagine_bot):
    w = discord_world
    upload = {"image": ("me.png", encode(noise(64, 64, seed=9), "PNG"))}
    options = {"prompt": "my photo", "seed": 4}
    inter = await w.fake.slash_command(w.alice, w.channel, "imagine", options, attachments=upload)
    parent_id = job_id_of((await inter.wait_original()).content)
    result = await inter.wait_followup(timeout=30)
    press = await w.fake.click_button(w.bob, result, f"reroll:{parent_id}")
    refused = await press.wait_original()
    assert refused.ephemeral and "started from an image" in refused.content
    assert len(job_rows(imagine_bot)) == 1
    own = await w.fake.click_button(w.alice, result, f"reroll:{parent_id}")
    assert (await new_job_from(await own.wait_original(), imagine_bot)).job.request.mode == "image"


FORGED_IDS = [
    "cancel:²",
    "cancel:٣",
    "cancel:" + "9" * 30,
    "reroll:" + "9" * 20,
    "vary:1:٣:subtle",
    "vary:1:0:gentle",
]


@pytest.mark.parametrize("how", ["forged", "planted"])
@pytest.mark.parametrize("custom_id", FORGED_IDS)
async def test_malformed_custom_ids_get_a_clean_private_answer(
    discord_world, imagine_bot, custom_id, how, caplog
):
    # forged: not on the message (discord.py drops it); planted: on a message of the bot's.
    w = discord_world
    if how == "forged":
        _, message = await result_of(imagine_bot, w.bob, prompt="a pond", seed=1)
    else:
        message = w.fake.plant_bot_message(w.channel, "old buttons", [custom_id])
    press = await w.fake.click_button(w.bob, message, custom_id, forged=how == "forged")
    answer = await press.wait_original()
    assert answer.ephemeral and "not one I made" in answer.content
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]
    assert len(job_rows(imagine_bot)) == (1 if how == "forged" else 0)


async def test_a_moderator_of_another_server_cannot_cancel(discord_world, settings, held_runner):
    w = discord_world
    other = w.fake.add_guild("Other Server")
    their_mod = w.fake.add_member(other, "othermod", moderator=True)
    async with running_bot(w.fake, settings, runner=held_runner) as bot:
        held_runner.hold()
        try:
            await bot.queued_job(await bot.imagine(w.bob, prompt="blocker", seed=1))
            await held_runner.wait_calls(1)
            asked = await bot.imagine(w.alice, prompt="a", seed=1)
            victim = await bot.queued_job(asked)
            # Job A's Cancel on a message in server B, as a hostile client would send it.
            forged = f"cancel:{victim.job.id}"
            elsewhere = w.fake.plant_bot_message(other.channel, "a status", [forged])
            press = await w.fake.click_button(their_mod, elsewhere, forged)
            refused = await press.wait_response()
            assert refused.ephemeral and "Only the member who asked" in refused.content
            assert (await bot.store.read(jobs.get, victim.job.id)).job.status == "queued"
            ours = await w.fake.click_button(w.mod, await asked.original(), forged)
            assert "cancelled" in (await ours.wait_response()).content
        finally:
            held_runner.release()


async def test_a_refused_reply_is_answered_by_a_reply_that_pings_nobody(discord_world, imagine_bot):
    w = discord_world
    _, result = await result_of(imagine_bot, w.alice, prompt="a barn", seed=5)
    mine = await w.fake.send_message(
        w.bob, w.channel, "@everyone a barn --steps 9999", reply_to=result
    )
    answer = await w.fake.wait_for_message(lambda m: m.reference == mine.id)
    assert "`steps`" in answer.content and "Nothing was queued" in answer.content
    assert answer.mention_ids == [] and not answer.mention_everyone
    assert len(job_rows(imagine_bot)) == 1  # only the first job


async def test_a_reply_that_fails_on_our_side_still_gets_an_answer(
    discord_world, imagine_bot, monkeypatch
):
    """A reply reaches the same funnel as a command: the member hears back, without the
    traceback, where discord.py would only have logged it."""
    w = discord_world
    _, result = await result_of(imagine_bot, w.alice, prompt="a barn", seed=5)

    async def broken(tx, message_id):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(jobs, "for_message", broken)
    mine = await w.fake.send_message(w.alice, w.channel, "a red barn", reply_to=result)
    answer = await w.fake.wait_for_message(lambda m: m.reference == mine.id)
    assert "Something went wrong on our side" in answer.content
    assert "disk on fire" not in answer.content and answer.mention_ids == []
    assert len(job_rows(imagine_bot)) == 1
