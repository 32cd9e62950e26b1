"""/imagine end to end: the real bot (cogs, service, executor, tiny model) in this process,
talking to the fake Discord over HTTP and the gateway."""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import replace

import numpy as np
import pytest
from conftest import TEST_LIMITS
from factories import pixels
from harness.answers import attachment_names, embed_field, job_id_of
from harness.in_process import running_bot
from test_admission_paths import mod
from test_images import encode, noise

from bot.db import Store, jobs
from bot.requests import DEFAULT_SCHEDULER, BatchKey, ImageSpec


def default_key(width: int = 64, height: int = 64) -> BatchKey:
    return BatchKey(
        model="tiny",
        mode="text",
        width=width,
        height=height,
        steps=TEST_LIMITS.default_steps,
        scheduler=DEFAULT_SCHEDULER,
        cfg=TEST_LIMITS.default_guidance > 1,
    )


def expected_pixels(runner, prompt: str, seed: int, key: BatchKey | None = None) -> np.ndarray:
    """The image the model makes for this prompt and seed alone, run directly."""
    [image] = runner.generate(key or default_key(), [ImageSpec(prompt, "", seed)])
    return pixels(image.image)


def assert_close(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert np.abs(actual - expected).max() <= 1  # at most 1/255


async def test_imagine_is_acknowledged_then_delivers_the_seeds_image(
    discord_world, imagine_bot, tiny_runner
):
    world, prompt = discord_world, "a red panda in the snow"
    inter = await imagine_bot.imagine(world.alice, prompt=prompt, seed=1234)

    first = await inter.wait_response(3)
    assert first.at - inter.dispatched_at < 3
    assert first.type in (4, 5) and not first.ephemeral
    if first.type == 4:
        assert "Queued as job #" in first.content

    followup = await inter.wait_followup(1, timeout=30)
    assert attachment_names(followup) == ["seed-1234.png"]
    assert embed_field(followup, "Seed") == "1234"
    assert world.alice.mention in followup.content
    await imagine_bot.wait_idle()
    delivered = pixels(followup.attachments[0])
    assert delivered.shape == (64, 64, 3)
    assert_close(delivered, expected_pixels(tiny_runner, prompt, 1234))

    record = await imagine_bot.store.read(jobs.get, job_id_of(first.content))
    assert record.job.request.seed == 1234 and record.job.status == "done"
    assert record.job.member_id == world.alice.id and record.interaction_id == inter.id
    assert (record.result_channel_id, record.result_message_id) == (world.channel.id, followup.id)

    again = await imagine_bot.imagine(world.bob, prompt=prompt, seed=1234)
    repeat = await again.wait_followup(1, timeout=30)
    assert_close(pixels(repeat.attachments[0]), delivered)


async def test_compatible_requests_made_during_a_batch_share_the_next_one(
    discord_world, imagine_bot, tiny_runner
):
    world, runner = discord_world, imagine_bot.runner
    runner.hold()
    first = await imagine_bot.imagine(world.alice, prompt="a lighthouse", seed=10)
    await runner.wait_calls(1)
    bob = await imagine_bot.imagine(world.bob, prompt="a lighthouse at dusk", seed=20)
    mod = await imagine_bot.imagine(world.mod, prompt="a lighthouse at dawn", seed=30)
    for inter in (bob, mod):  # acknowledged while the first batch is still running
        response = await inter.wait_response(3)
        assert response.at - inter.dispatched_at < 3 and "Queued as job #" in response.content
    runner.release()
    await imagine_bot.wait_idle()

    records = [await imagine_bot.queued_job(inter) for inter in (first, bob, mod)]
    assert records[1].job.batch_id == records[2].job.batch_id != records[0].job.batch_id
    assert records[1].batch_size == 2
    assert [[spec.seed for spec in specs] for _key, specs in runner.calls] == [[10], [20, 30]]

    for inter, member, prompt, seed in (
        (bob, world.bob, "a lighthouse at dusk", 20),
        (mod, world.mod, "a lighthouse at dawn", 30),
    ):
        followup = await inter.wait_followup(1)
        assert member.mention in followup.content
        assert attachment_names(followup) == [f"seed-{seed}.png"]
        assert embed_field(followup, "Seed") == str(seed)
        assert_close(pixels(followup.attachments[0]), expected_pixels(tiny_runner, prompt, seed))


async def test_incompatible_requests_never_share_a_batch_and_the_earlier_goes_first(
    discord_world, imagine_bot
):
    world, runner = discord_world, imagine_bot.runner
    runner.hold()
    blocker = await imagine_bot.imagine(world.mod, prompt="hold the line", seed=1)
    await runner.wait_calls(1)
    wide = await imagine_bot.imagine(world.alice, prompt="a wide view", seed=2, width=128)
    small = await imagine_bot.imagine(world.bob, prompt="a small view", seed=3)
    await wide.wait_response(3)
    await small.wait_response(3)
    runner.release()
    await imagine_bot.wait_idle()

    records = [await imagine_bot.queued_job(inter) for inter in (blocker, wide, small)]
    assert len({record.job.batch_id for record in records}) == 3
    assert [(key.width, len(specs)) for key, specs in runner.calls] == [(64, 1), (128, 1), (64, 1)]
    wide_result, small_result = await wide.wait_followup(1), await small.wait_followup(1)
    assert wide_result.at < small_result.at
    assert pixels(wide_result.attachments[0]).shape == (64, 128, 3)


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"prompt": "a cat", "steps": TEST_LIMITS.max_steps + 1}, "steps"),
        ({"prompt": "a cat", "width": 100}, "width"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "a cat", "scheduler": "Warp Drive"}, "scheduler"),
    ],
    ids=["steps", "width", "empty-prompt", "scheduler"],
)
async def test_a_bad_option_is_refused_privately_and_nothing_is_queued(
    discord_world, imagine_bot, options, option
):
    inter = await imagine_bot.imagine(discord_world.alice, **options)
    response = await inter.wait_response(3)
    assert response.type == 4 and response.ephemeral
    assert f"`{option}`" in response.content
    assert await imagine_bot.store.read(jobs.count) == 0
    assert imagine_bot.runner.calls == [] and inter.followup_ids == []


async def test_count_two_delivers_a_grid_and_both_seeds(discord_world, imagine_bot, tiny_runner):
    inter = await imagine_bot.imagine(discord_world.alice, prompt="two owls", seed=7, count=2)
    followup = await inter.wait_followup(1, timeout=30)
    assert attachment_names(followup) == ["grid.png", "seed-7.png", "seed-8.png"]
    assert embed_field(followup, "Seeds") == "7, 8"
    grid, seven, eight = (pixels(a) for a in followup.attachments)
    assert grid.shape == (64, 128, 3)
    assert (grid[:, :64] == seven).all() and (grid[:, 64:] == eight).all()
    await imagine_bot.wait_idle()
    assert_close(seven, expected_pixels(tiny_runner, "two owls", 7))
    assert_close(eight, expected_pixels(tiny_runner, "two owls", 8))
    assert len(inter.followup_ids) == 1


async def test_a_prompt_over_75_tokens_is_queued_without_a_note(discord_world, imagine_bot):
    inter = await imagine_bot.imagine(discord_world.alice, prompt="word " * 30, seed=3)
    response = await inter.wait_response(3)
    assert "Queued as job #" in response.content and "ignored" not in response.content
    await inter.wait_followup(1, timeout=30)


async def test_an_old_interaction_gets_its_result_as_a_channel_message(
    discord_world, imagine_bot, monkeypatch
):
    world = discord_world
    monkeypatch.setattr(imagine_bot.module("cogs.delivery"), "FOLLOWUP_WINDOW_SECONDS", 0)
    inter = await imagine_bot.imagine(world.alice, prompt="an old token", seed=5)
    job_id = job_id_of((await inter.wait_response(3)).content)

    message = await world.fake.wait_for_message(
        lambda m: m.channel_id == world.channel.id and bool(m.attachments), timeout=30
    )
    assert message.webhook_id is None and message.interaction_id is None
    assert inter.followup_ids == []
    assert world.alice.mention in message.content and world.alice.id in message.mention_ids
    assert message.nonce is not None
    assert attachment_names(message) == ["seed-5.png"]
    await imagine_bot.wait_idle()
    record = await imagine_bot.store.read(jobs.get, job_id)
    assert (record.result_channel_id, record.result_message_id) == (world.channel.id, message.id)


async def test_a_channel_that_refuses_the_bot_gets_the_result_by_dm(
    discord_world, imagine_bot, monkeypatch
):
    world, fake = discord_world, discord_world.fake
    monkeypatch.setattr(imagine_bot.module("cogs.delivery"), "FOLLOWUP_WINDOW_SECONDS", 0)
    fake.deny_send(world.channel)
    inter = await imagine_bot.imagine(world.alice, prompt="a private view", seed=6)
    job_id = job_id_of((await inter.wait_response(3)).content)

    dm = fake.dm_channel(world.alice)
    message = await fake.wait_for_message(lambda m: m.channel_id == dm.id, timeout=30)
    assert attachment_names(message) == ["seed-6.png"]
    assert embed_field(message, "Seed") == "6"
    assert any(r.status == 403 and r.path.endswith("/messages") for r in fake.refused)
    await imagine_bot.wait_idle()
    record = await imagine_bot.store.read(jobs.get, job_id)
    assert (record.result_channel_id, record.result_message_id) == (dm.id, message.id)


async def test_shutdown_past_the_grace_returns_the_running_job_to_the_queue(
    discord_world, settings, held_runner
):
    world, fake = discord_world, discord_world.fake
    held_runner.hold()
    async with running_bot(fake, replace(settings, shutdown_grace=0.2), runner=held_runner) as bot:
        inter = await bot.imagine(world.alice, prompt="interrupted", seed=9)
        job_id = job_id_of((await inter.wait_response(3)).content)
        await held_runner.wait_calls(1)
    # Leaving the block shuts down as SIGTERM does: the batch outlasts the grace.
    closed = await fake.wait_for_close(5)
    assert closed.by_client
    reopened = await Store.open(settings.database_path)
    try:
        record = await reopened.read(jobs.get, job_id)
    finally:
        await reopened.close()
    assert record.job.status == "queued" and record.result_message_id is None
    assert inter.followup_ids == []


# ---- slow work after the first answer, and the order of the checks (issue 13) ---------------


async def slow_image_path(w, bot, path):
    """Start `path` (an image to download and decode) as alice and return its handle."""
    if path == "slash with image":
        upload = ("in.png", encode(noise(64, 64, seed=2), "PNG"))
        return await w.fake.slash_command(
            w.alice, w.channel, "imagine", {"prompt": "a bay"}, attachments={"image": upload}
        )
    inter = await bot.imagine(w.mod, prompt="a bay", seed=3)
    job_id = job_id_of((await inter.wait_response()).content)
    result = await inter.wait_followup(timeout=30)
    if path == "Vary button":
        return await w.fake.click_button(w.alice, result, f"vary:{job_id}:0:strong")
    return await w.fake.message_command(w.alice, w.channel, "Vary", result)


@pytest.mark.parametrize("path", ["slash with image", "Vary button", "Vary context menu"])
async def test_image_paths_answer_within_three_seconds_of_slow_decoding(
    discord_world, imagine_bot, monkeypatch, path
):
    service = imagine_bot.service
    decode = service.prepare_init_image

    async def slow(data):
        await asyncio.sleep(3.5)  # a big upload on a busy machine
        return await decode(data)

    monkeypatch.setattr(service, "prepare_init_image", slow)
    handle = await slow_image_path(discord_world, imagine_bot, path)
    first = await handle.wait_response(timeout=10)
    assert first.at - handle.dispatched_at < 3.0
    status = await handle.wait_original(timeout=15)
    assert "Queued as job #" in status.content
    assert discord_world.fake.problems() == []


async def test_a_banned_members_upload_is_never_downloaded(discord_world, imagine_bot):
    w = discord_world
    banned = await w.fake.slash_command(
        w.mod, w.channel, "mod", {"member": w.alice}, subcommands=("ban",)
    )
    await banned.wait_response()
    upload = ("in.png", encode(noise(64, 64, seed=2), "PNG"))
    inter = await w.fake.slash_command(
        w.alice, w.channel, "imagine", {"prompt": "a bay"}, attachments={"image": upload}
    )
    refused = await inter.wait_original()
    assert refused.ephemeral and "can't generate images" in refused.content
    assert [r for r in w.fake.requests if r.path.startswith("/attachments/")] == []


async def test_uploads_are_decoded_on_a_small_pool_of_their_own(
    discord_world, imagine_bot, monkeypatch
):
    import threading

    import bot.uploads

    threads = []
    decode = bot.uploads.decode_upload

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return decode(*args, **kwargs)

    monkeypatch.setattr(bot.uploads, "decode_upload", recording)
    handle = await slow_image_path(discord_world, imagine_bot, "slash with image")
    await handle.wait_original()
    assert threads and all(name.startswith("decode-upload") for name in threads), threads


async def test_a_failure_after_admission_does_not_say_nothing_was_charged(
    discord_world, imagine_bot, monkeypatch
):
    async def broken(job_ids):
        raise RuntimeError("the status could not be shown")

    monkeypatch.setattr(imagine_bot.bot.service, "queue_estimates", broken)
    inter = await imagine_bot.imagine(discord_world.alice, prompt="a bay", seed=1)
    answer = await inter.wait_original()
    assert "nothing was charged" not in answer.content
    assert "queued" in answer.content and "job #1" in answer.content
    monkeypatch.undo()
    await imagine_bot.wait_idle()


@pytest.mark.parametrize("limit", ["queue", "quota"])
async def test_an_upload_that_admission_would_refuse_is_never_downloaded(
    discord_world, imagine_bot, limit
):
    """What can be refused without the pixels (the member's queue limit, a quota used up) is
    refused before the upload is downloaded and decoded on the shared pool."""
    w = discord_world
    if limit == "quota":
        await mod(w, "quota", "set", member=w.alice, limit=0.003)
        await imagine_bot.queued_job(await imagine_bot.imagine(w.alice, prompt="one", seed=9))
        await imagine_bot.wait_idle()
        expected = "none is left"
    else:
        imagine_bot.runner.hold()
        for seed in (11, 12, 13):
            await imagine_bot.queued_job(await imagine_bot.imagine(w.alice, prompt="x", seed=seed))
        expected = "the limit is 3"
    upload = ("in.png", encode(noise(64, 64, seed=2), "PNG"))
    inter = await w.fake.slash_command(
        w.alice, w.channel, "imagine", {"prompt": "a bay"}, attachments={"image": upload}
    )
    refused = await inter.wait_original()
    assert refused.ephemeral and expected in refused.content
    assert [r for r in w.fake.requests if r.path.startswith("/attachments/")] == []
    imagine_bot.runner.release()
    await imagine_bot.wait_idle()


async def test_one_member_holds_at_most_one_decode_at_a_time(
    discord_world, imagine_bot, monkeypatch
):
    w = discord_world
    service = imagine_bot.service
    decode = service.prepare_init_image
    running: dict[int, int] = {}
    most: dict[int, int] = {}
    whose = contextvars.ContextVar("whose")

    async def slow(data):
        member = whose.get()
        running[member] = running.get(member, 0) + 1
        most[member] = max(most.get(member, 0), running[member])
        await asyncio.sleep(0.3)
        running[member] -= 1
        return await decode(data)

    one_decode = service.gate.one_decode

    def tagged(member_id):
        whose.set(member_id)
        return one_decode(member_id)

    monkeypatch.setattr(service, "prepare_init_image", slow)
    monkeypatch.setattr(service.gate, "one_decode", tagged)
    upload = ("in.png", encode(noise(64, 64, seed=2), "PNG"))
    sent = [
        await w.fake.slash_command(
            member, w.channel, "imagine", {"prompt": "a bay"}, attachments={"image": upload}
        )
        for member in (w.alice, w.alice, w.alice, w.bob)
    ]
    for inter in sent:
        assert "Queued as job #" in (await inter.wait_original(timeout=20)).content
    assert most == {w.alice.id: 1, w.bob.id: 1}
    await imagine_bot.wait_idle()
