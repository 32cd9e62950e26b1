"""A result Discord cannot take as one message: more buttons than fit five rows, more than ten
files, more bytes than the upload limit, an error longer than 2,000 characters. The member
gets their images (split up if need be) or a clear failure with a refund, never a status that
says "generating" forever and a charge for nothing."""

from dataclasses import replace

import fakediscord.interactions
import fakediscord.validation
import pytest
from harness.answers import attachment_names, job_id_of
from harness.in_process import running_bot

from bot.db import jobs, quotas


@pytest.fixture
async def ten_bot(discord_world, settings, held_runner):
    """Members may ask for ten images, the most MAX_IMAGES_PER_REQUEST allows."""
    many = replace(settings, max_batch_size=10, limits=replace(settings.limits, max_count=10))
    async with running_bot(discord_world.fake, many, runner=held_runner) as running:
        yield running


def button_ids(message):
    rows = message.components
    assert len(rows) <= 5 and all(len(row["components"]) <= 5 for row in rows)
    return [item["custom_id"] for row in rows for item in row["components"]]


async def used(bot, world, member):
    status = await bot.store.read(quotas.status, world.guild.id, member.id, default_limit=50)
    return status.used


def limit_uploads(monkeypatch, limit, *, announced=True):
    """Make the fake Discord refuse uploads over `limit` bytes; `announced` also tells the
    bot so (the interaction's attachment_size_limit), else only the 413 says it."""
    monkeypatch.setattr(fakediscord.validation, "MAX_UPLOAD_BYTES", limit)
    if announced:
        monkeypatch.setattr(fakediscord.interactions, "ATTACHMENT_SIZE_LIMIT", limit)


@pytest.mark.parametrize("count", [6, 10])
async def test_many_images_fit_discords_rows_and_attachments(discord_world, ten_bot, count):
    w = discord_world
    inter = await ten_bot.imagine(w.alice, prompt="many", seed=1, count=count)
    job_id = job_id_of((await inter.wait_response()).content)
    result = await inter.wait_followup(timeout=60)
    names = attachment_names(result)
    assert len(names) <= 10
    assert {f"seed-{seed}.png" for seed in range(1, count + 1)} <= set(names)
    # Past four images, each gets the 🔎 button that opens it alone with Vary and the tools.
    ids = button_ids(result)
    assert ids == [f"tools:{job_id}:{i}" for i in range(count)] + [f"reroll:{job_id}"]
    await ten_bot.wait_idle()
    assert (await ten_bot.store.read(jobs.get, job_id)).job.status == "done"
    assert (await inter.original()).deleted  # the result replaced the status message


async def test_images_over_the_upload_limit_are_split_over_several_messages(
    discord_world, ten_bot, monkeypatch
):
    w = discord_world
    # Each 256×256 image of the tiny model is a PNG of about 190 KB; two fit, three do not.
    limit_uploads(monkeypatch, 450_000)
    inter = await ten_bot.imagine(w.alice, prompt="big", seed=1, count=5, width=256, height=256)
    job_id = job_id_of((await inter.wait_response()).content)
    await ten_bot.wait_idle(60)
    messages = inter.followups
    assert len(messages) >= 3
    delivered = [name for message in messages for name in attachment_names(message)]
    assert sorted(delivered) == [f"seed-{seed}.png" for seed in range(1, 6)]  # no grid
    for message in messages:
        assert sum(len(a.data) for a in message.attachments) <= 450_000
        seeds = {int(name[5:-4]) for name in attachment_names(message)}
        varies = [i for i in button_ids(message) if i.startswith("vary:")]
        assert {int(i.split(":")[2]) + 1 for i in varies} == seeds  # its own images' buttons
    assert messages[0].content.startswith(f"<@{w.alice.id}> job #{job_id}")
    assert sum(f"reroll:{job_id}" in button_ids(m) for m in messages) == 1
    assert (await ten_bot.store.read(jobs.get, job_id)).job.status == "done"
    assert await used(ten_bot, w, w.alice) == 0.2  # 5 × 256×256 × 4 steps, not refunded


async def test_a_413_from_discord_splits_the_result_further(discord_world, ten_bot, monkeypatch):
    """Discord's answer is the authority: a smaller limit than the one announced still gets
    the images delivered, in smaller messages."""
    w = discord_world
    limit_uploads(monkeypatch, 450_000, announced=False)
    inter = await ten_bot.imagine(w.alice, prompt="big", seed=1, count=4, width=256, height=256)
    job_id = job_id_of((await inter.wait_response()).content)
    await ten_bot.wait_idle(60)
    assert {r.status for r in w.fake.rejected} == {413}
    w.fake.rejected.clear()  # provoked on purpose
    delivered = [name for message in inter.followups for name in attachment_names(message)]
    assert sorted(delivered) == [f"seed-{seed}.png" for seed in range(1, 5)]
    assert (await ten_bot.store.read(jobs.get, job_id)).job.status == "done"


async def test_an_image_too_big_to_upload_fails_the_job_with_a_refund(
    discord_world, ten_bot, monkeypatch
):
    w = discord_world
    limit_uploads(monkeypatch, 2_000)
    inter = await ten_bot.imagine(w.alice, prompt="huge", seed=1, count=2)
    job_id = job_id_of((await inter.wait_response()).content)
    await ten_bot.wait_idle(60)
    record = await ten_bot.store.read(jobs.get, job_id)
    assert record.job.status == "failed" and "could not be delivered" in record.error
    assert await used(ten_bot, w, w.alice) == 0
    notice = await inter.wait_followup()
    assert "could not be delivered" in notice.content and "refunded" in notice.content
    assert not notice.attachments
    status = await inter.original()
    assert status.deleted or "generating" not in status.content
    assert ten_bot.bot.status_board.statuses == {}


class LongWinded:
    """The real runner, except that every call fails with a 5,000-character message."""

    def __init__(self, runner):
        self.runner = runner

    def generate(self, key, specs, **options):
        raise RuntimeError("x" * 5000)

    def __getattr__(self, name):
        return getattr(self.runner, name)


async def test_a_long_error_is_cut_to_fit_a_message(discord_world, settings, tiny_runner):
    w = discord_world
    async with running_bot(w.fake, settings, runner=LongWinded(tiny_runner)) as bot:
        inter = await bot.imagine(w.alice, prompt="doomed", seed=1)
        job_id = job_id_of((await inter.wait_response()).content)
        notice = await inter.wait_followup(timeout=30)
        assert len(notice.content) <= 2000
        assert f"job #{job_id} failed: RuntimeError: xxx" in notice.content
        assert notice.content.endswith("Its images were refunded.")
        await bot.wait_idle()
        assert (await inter.original()).deleted
        assert (await bot.store.read(jobs.get, job_id)).job.status == "failed"
        assert bot.bot.status_board.statuses == {}
