"""Upscale ×2, Zoom Out and Pan through the fake Discord: the buttons under a result (and the
🔎 opener on results of several images), the reply flags, the jobs they admit (init image,
strength, inpainting model, parent, quota by cost, /history) and what they deliver."""

import io
from dataclasses import replace

import numpy as np
import pytest
from factories import pixels
from harness.answers import job_id_of
from harness.in_process import running_bot
from PIL import Image

from bot.db import jobs, members, quotas

MODELS = """
default = "tiny"

[models.tiny]
source = "tiny"
inpaint = "tiny-inpaint"

[models.tiny-inpaint]
source = "tiny-inpaint"
"""


@pytest.fixture
def roomy(settings, tmp_path):
    """Results up to 512² (so a 256² image may double), `tiny` painting its Zoom Out and Pan
    fills with the built-in `tiny-inpaint`."""
    (tmp_path / "models.toml").write_text(MODELS)
    return replace(
        settings,
        limits=replace(settings.limits, max_side=512),
        models_file=tmp_path / "models.toml",
        pan_step=128,
        daily_quota=50,
    )


@pytest.fixture
async def upscale_bot(discord_world, roomy, held_runner):
    async with running_bot(discord_world.fake, roomy, runner=held_runner) as running:
        try:
            yield running
        finally:
            held_runner.release()


def ids_of(message):
    rows = message.components
    assert len(rows) <= 5 and all(len(row["components"]) <= 5 for row in rows)
    return [c["custom_id"] for row in rows for c in row["components"]]


async def result_of(bot, member, **options):
    inter = await bot.imagine(member, **options)
    job_id = job_id_of((await inter.wait_response()).content)
    return job_id, await inter.wait_followup(timeout=30)


async def press(w, bot, member, message, custom_id):
    """Click and return (the new job's record, the delivered message)."""
    click = await w.fake.click_button(member, message, custom_id)
    job_id = job_id_of((await click.wait_original(lambda m: "job #" in m.content)).content)
    await bot.wait_idle()
    return await bot.store.read(jobs.get, job_id), await click.wait_followup(timeout=30)


async def used(bot, w, member):
    status = await bot.store.read(quotas.status, w.guild.id, member.id, default_limit=50)
    return status.used


def decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


async def test_upscale_subtle_starts_from_the_parent_resized_twice(
    discord_world, upscale_bot, held_runner
):
    w, bot = discord_world, upscale_bot
    parent_id, result = await result_of(
        bot, w.alice, prompt="a harbour", seed=5, steps=4, width=256, height=256
    )
    ids = ids_of(result)
    assert f"op:{parent_id}:0:upscale-subtle" in ids and f"op:{parent_id}:0:pan-down" in ids
    before = await used(bot, w, w.bob)
    record, delivered = await press(w, bot, w.bob, result, f"op:{parent_id}:0:upscale-subtle")
    request = record.job.request
    assert (request.mode, request.strength, request.operation) == ("image", 0.3, "upscale-subtle")
    assert (request.prompt, request.seed, request.model) == ("a harbour", 5, "tiny")
    assert (record.job.parent_job_id, record.job.parent_image_index) == (parent_id, 0)
    parent = Image.open(io.BytesIO(result.attachments[0].data)).convert("RGB")
    resized = np.asarray(parent.resize((512, 512), Image.Resampling.LANCZOS)).astype(int)
    stored = await bot.store.read(jobs.init_image, request.init_image_hash)
    assert np.array_equal(decoded(stored), resized)
    key, specs = held_runner.calls[-1]
    assert (key.mode, key.width, key.image_steps) == ("image", 512, int(4 * 0.3))
    assert np.array_equal(np.asarray(specs[0].init_image).astype(int), resized)
    assert pixels(delivered.attachments[0]).shape == (512, 512, 3)
    assert await used(bot, w, w.bob) == pytest.approx(before + request.cost)
    assert request.cost == 0.04  # 512² × the one step denoised, not four
    # The result offers the tools again, less those past 512².
    again = ids_of(delivered)
    assert (
        f"op:{record.job.id}:0:pan-left" not in again and f"vary:{record.job.id}:0:subtle" in again
    )


async def test_zoom_and_pan_keep_the_parents_pixels_and_show_in_history(
    discord_world, upscale_bot, held_runner
):
    w, bot = discord_world, upscale_bot
    parent_id, result = await result_of(
        bot, w.alice, prompt="a mill", seed=2, steps=3, width=256, height=256
    )
    parent = decoded(result.attachments[0].data)
    zoom, zoomed = await press(w, bot, w.alice, result, f"op:{parent_id}:0:zoom-2")
    request = zoom.job.request
    assert (request.mode, request.model, request.strength) == ("inpaint", "tiny-inpaint", None)
    assert request.keep_box == (128, 128, 384, 384) and request.cost == 0.12  # 512² × 3 steps
    image = pixels(zoomed.attachments[0]).astype(int)
    assert image.shape == (512, 512, 3)
    assert np.array_equal(image[128 + 16 : 384 - 16, 128 + 16 : 384 - 16], parent[16:-16, 16:-16])
    assert held_runner.calls[-1][0].mode == "inpaint"

    pan, panned = await press(w, bot, w.alice, result, f"op:{parent_id}:0:pan-right")
    image = pixels(panned.attachments[0]).astype(int)
    assert image.shape == (256, 384, 3)  # widened by PAN_STEP
    assert np.array_equal(image[:, : 256 - 16], parent[:, : 256 - 16])
    assert pan.job.request.keep_box == (0, 0, 256, 256)
    assert await used(bot, w, w.alice) == pytest.approx(0.03 + 0.12 + 0.045)

    history = await w.fake.slash_command(w.alice, w.channel, "history", {})
    text = (await history.wait_response()).content
    assert "Zoom Out ×2" in text and "Pan right" in text


async def test_no_button_past_max_size_and_the_opener_on_several_images(discord_world, upscale_bot):
    w, bot = discord_world, upscale_bot
    wide_id, wide = await result_of(
        bot, w.alice, prompt="a coast", seed=1, steps=2, width=512, height=256
    )
    tools = [i for i in ids_of(wide) if i.startswith("op:")]
    assert tools == [f"op:{wide_id}:0:pan-up", f"op:{wide_id}:0:pan-down"]  # 512 wide already
    many_id, many = await result_of(bot, w.alice, prompt="kites", seed=1, count=2, steps=2)
    assert ids_of(many) == [
        f"vary:{many_id}:0:subtle",
        f"vary:{many_id}:0:strong",
        f"tools:{many_id}:0",
        f"vary:{many_id}:1:subtle",
        f"vary:{many_id}:1:strong",
        f"tools:{many_id}:1",
        f"reroll:{many_id}",
    ]
    opened = await (await w.fake.click_button(w.bob, many, f"tools:{many_id}:1")).wait_followup()
    assert opened.ephemeral and [a.filename for a in opened.attachments] == ["seed-2.png"]
    assert f"op:{many_id}:1:upscale-creative" in ids_of(opened)
    record, delivered = await press(w, bot, w.bob, opened, f"op:{many_id}:1:upscale-creative")
    assert record.job.request.strength == 0.55 and record.job.request.seed == 2
    assert pixels(delivered.attachments[0]).shape == (128, 128, 3)


async def test_reply_flags_upscale_zoom_and_pan(discord_world, upscale_bot):
    w, bot = discord_world, upscale_bot
    parent_id, result = await result_of(
        bot, w.alice, prompt="a barn", seed=9, steps=2, width=128, height=128
    )

    async def reply(text):
        mine = await w.fake.send_message(w.bob, w.channel, text, reply_to=result)
        return await w.fake.wait_for_message(lambda m: m.reference == mine.id)

    status = await reply("--upscale creative")
    record = await bot.store.read(jobs.get, job_id_of(status.content))
    assert (record.job.request.operation, record.job.request.strength) == ("upscale-creative", 0.55)
    assert record.job.parent_job_id == parent_id and record.job.request.width == 256
    status = await reply(".. --pan up")
    assert (await bot.store.read(jobs.get, job_id_of(status.content))).job.request.height == 256
    for text, answer in [
        ("--zoom 3", "must be one of: 1.5, 2"),
        ("--pan left --zoom 2", "one of --upscale, --zoom or --pan at a time"),
        ("a red barn --upscale subtle", "reply with the flag alone"),
        ("--pan sideways", "left, right, up, down"),
    ]:
        assert answer in (await reply(text)).content
    await bot.wait_idle()
    assert len(await bot.store.read(members.history, w.bob.id, limit=10)) == 2


@pytest.mark.parametrize(
    "custom_id", ["op:1:0:explode", "op:1:٣:zoom-2", "op:" + "9" * 20 + ":0:pan-up", "tools:1:x"]
)
async def test_hostile_tool_ids_get_a_clean_answer(discord_world, upscale_bot, custom_id):
    w = discord_world
    message = w.fake.plant_bot_message(w.channel, "old buttons", [custom_id])
    answer = await (await w.fake.click_button(w.bob, message, custom_id)).wait_original()
    assert answer.ephemeral and "not one I made" in answer.content


async def test_the_tools_work_after_a_restart_and_reroll_repeats_the_operation(
    discord_world, roomy, tiny_runner
):
    w = discord_world
    async with running_bot(w.fake, roomy, runner=tiny_runner) as bot:
        parent_id, result = await result_of(bot, w.alice, prompt="a kite", seed=3, steps=2)
    identified = len(w.fake.identifies)
    async with running_bot(w.fake, roomy, runner=tiny_runner) as bot:
        await w.fake.wait_until(lambda: len(w.fake.identifies) > identified or None)
        zoom, zoomed = await press(w, bot, w.alice, result, f"op:{parent_id}:0:zoom-1.5")
        assert zoom.job.parent_job_id == parent_id and zoom.job.request.width == 96
        again, _ = await press(w, bot, w.alice, zoomed, f"reroll:{zoom.job.id}")
        request = again.job.request
        assert (request.mode, request.operation, request.keep_box) == (
            "inpaint",
            "zoom-1.5",
            zoom.job.request.keep_box,
        )
        assert request.model == "tiny-inpaint" and request.seed != zoom.job.request.seed
        # Vary draws with the model the inpainting model paints for.
        varied, _ = await press(w, bot, w.bob, zoomed, f"vary:{zoom.job.id}:0:strong")
        assert (varied.job.request.mode, varied.job.request.model) == ("image", "tiny")
