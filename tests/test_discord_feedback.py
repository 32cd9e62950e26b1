"""What a member sees while waiting: position and ETA, progress with previews, Cancel,
their /settings defaults, and the dry run with Confirm."""

import asyncio
import sqlite3
from dataclasses import replace

import pytest
from harness.answers import job_id_of
from harness.in_process import running_bot

from bot.db import jobs, quotas
from bot.throttle import EditThrottle


class SlowSteps:
    """The real runner with each denoising step stretched (in the worker thread), so a test
    can watch progress edits arrive; what the steps compute is unchanged."""

    def __init__(self, runner, seconds):
        self.runner = runner
        self.seconds = seconds

    def generate(self, key, specs, *, progress=None, preview_every=0):
        import time

        def slow(done, total, previews):
            time.sleep(self.seconds)
            if progress is not None:
                progress(done, total, previews)

        return self.runner.generate(key, specs, progress=slow, preview_every=preview_every)

    def __getattr__(self, name):
        return getattr(self.runner, name)


@pytest.fixture
async def slow_bot(discord_world, settings, tiny_runner):
    fast_edits = replace(settings, preview_every=3)
    async with running_bot(
        discord_world.fake, fast_edits, runner=SlowSteps(tiny_runner, 0.15)
    ) as running:
        running.bot.status_board.throttle = EditThrottle(per_message=0.3, rate=20, burst=20)
        yield running


def versions(message):
    return [*message.edits, message]


async def test_progress_bar_and_previews_are_edited_into_the_status_message(
    discord_world, slow_bot
):
    inter = await slow_bot.imagine(discord_world.alice, prompt="a castle", seed=4, steps=12)
    first = await inter.wait_response(3)
    assert first.content.startswith("Queued as job #")
    assert any(
        c["custom_id"].startswith("cancel:") for row in first.components for c in row["components"]
    )
    result = await inter.wait_followup(timeout=30)
    assert result.attachments[0].filename == "seed-4.png"
    # The result replaces the status message and its preview.
    status = await inter.wait_original(lambda m: m.deleted)
    seen = versions(status)
    assert any("generating" in v.content and "step" in v.content for v in seen)
    previews = [v for v in seen if any(a.filename == "preview.png" for a in v.attachments)]
    assert previews, "no preview image was edited in before the result"
    assert previews[0].at < result.at


async def test_previews_can_be_turned_off(discord_world, settings, tiny_runner):
    no_previews = replace(settings, preview_every=0)
    async with running_bot(
        discord_world.fake, no_previews, runner=SlowSteps(tiny_runner, 0.15)
    ) as bot:
        bot.bot.status_board.throttle = EditThrottle(per_message=0.3, rate=20, burst=20)
        inter = await bot.imagine(discord_world.alice, prompt="a castle", seed=4, steps=12)
        await inter.wait_followup(timeout=30)
        seen = versions(await inter.original())
        assert any("generating" in v.content for v in seen)
        assert not any(v.attachments for v in seen)


async def test_queue_position_and_eta_move_up(discord_world, imagine_bot, held_runner):
    w = discord_world
    imagine_bot.bot.status_board.throttle = EditThrottle(per_message=0.1, rate=50, burst=50)
    # One measured batch first, so there is a speed to estimate from.
    await (await imagine_bot.imagine(w.bob, prompt="warm-up", seed=1)).wait_followup()
    held_runner.hold()
    running = await imagine_bot.imagine(w.bob, prompt="first", seed=2)
    await held_runner.wait_calls(2)
    second = await imagine_bot.imagine(w.alice, prompt="second", seed=3, width=128)
    third = await imagine_bot.imagine(w.alice, prompt="third", seed=4, width=192)
    assert (await running.wait_response()).content
    assert "next in line, about" in (await second.wait_response()).content
    assert "position 2 in the queue, about" in (await third.wait_response()).content
    held_runner.release()
    moved = await third.wait_original(lambda m: "next in line" in m.content or m.deleted, 20)
    assert moved is not None
    await imagine_bot.wait_idle()


async def test_cancel_a_queued_job_refunds_it_and_it_never_runs(
    discord_world, imagine_bot, held_runner
):
    w = discord_world
    held_runner.hold()
    await imagine_bot.imagine(w.bob, prompt="blocking", seed=1)
    await held_runner.wait_calls(1)
    inter = await imagine_bot.imagine(w.alice, prompt="doomed", seed=2, width=128, count=2)
    job_id = job_id_of((await inter.wait_response()).content)
    status = await inter.original()
    stranger = await w.fake.click_button(w.bob, status, f"cancel:{job_id}")
    assert "Only the member who asked" in (await stranger.wait_response()).content
    pressed = await w.fake.click_button(w.alice, status, f"cancel:{job_id}")
    assert "cancelled" in (await pressed.wait_response()).content
    assert (await imagine_bot.store.read(jobs.get, job_id)).job.status == "cancelled"
    quota = await imagine_bot.store.read(quotas.status, w.guild.id, w.alice.id, default_limit=10)
    assert quota.used == 0
    held_runner.release()
    await imagine_bot.wait_idle()
    assert all(spec.prompt != "doomed" for _, specs in held_runner.calls for spec in specs)
    assert inter.followup_ids == []


async def test_a_button_that_fails_still_answers_the_member(
    discord_world, imagine_bot, held_runner, monkeypatch
):
    """discord.py only logs an exception raised in a button's callback; ours reach the same
    error funnel as a slash command's, so the member hears back (privately, no traceback)."""
    w = discord_world
    held_runner.hold()
    inter = await imagine_bot.imagine(w.alice, prompt="stuck", seed=1)
    job_id = job_id_of((await inter.wait_response()).content)

    async def broken(tx, job_id):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(jobs, "request_cancel", broken)
    pressed = await w.fake.click_button(w.alice, await inter.original(), f"cancel:{job_id}")
    answer = await pressed.wait_response()
    assert answer.ephemeral and "Something went wrong on our side" in answer.content
    assert "disk on fire" not in answer.content
    held_runner.release()
    await imagine_bot.wait_idle()


async def test_cancel_every_running_job_interrupts_the_call(
    discord_world, imagine_bot, held_runner
):
    w = discord_world
    held_runner.hold()
    inter = await imagine_bot.imagine(w.alice, prompt="stop me", seed=5)
    job_id = job_id_of((await inter.wait_response()).content)
    await held_runner.wait_calls(1)
    pressed = await w.fake.click_button(w.mod, await inter.original(), f"cancel:{job_id}")
    assert "will be dropped and refunded" in (await pressed.wait_response()).content
    await imagine_bot.wait_idle()
    record = await imagine_bot.store.read(jobs.get, job_id)
    assert record.job.status == "cancelled" and record.result_message_id is None
    assert inter.followup_ids == []
    final = await inter.original()
    assert "was cancelled" in final.content


async def test_cancel_one_of_two_running_jobs_drops_only_its_images(
    discord_world, imagine_bot, held_runner
):
    w = discord_world
    held_runner.hold()
    await (await imagine_bot.imagine(w.bob, prompt="first", seed=1)).wait_response()
    await held_runner.wait_calls(1)
    mine = await imagine_bot.imagine(w.alice, prompt="mine", seed=2)
    theirs = await imagine_bot.imagine(w.bob, prompt="theirs", seed=3)
    mine_id = job_id_of((await mine.wait_response()).content)
    await theirs.wait_response()
    held_runner.release()  # the first call goes on; the next one (mine + theirs) waits
    held_runner.hold()
    await held_runner.wait_calls(2)
    pressed = await w.fake.click_button(w.alice, await mine.original(), f"cancel:{mine_id}")
    assert "will be dropped" in (await pressed.wait_response()).content
    held_runner.release()
    await imagine_bot.wait_idle()
    assert len(held_runner.calls[1][1]) == 2  # both ran in one call: it was not interrupted
    assert (await imagine_bot.store.read(jobs.get, mine_id)).job.status == "cancelled"
    assert mine.followup_ids == []
    assert (await theirs.wait_followup()).attachments[0].filename == "seed-3.png"


async def test_settings_defaults_apply_and_options_override(discord_world, imagine_bot):
    w = discord_world
    saved = await w.fake.slash_command(
        w.alice,
        w.channel,
        "settings",
        {"steps": 6, "width": 128, "scheduler": "Euler a", "negative_prompt": "blurry"},
    )
    reply = await saved.wait_response()
    assert reply.ephemeral and "steps: 6" in reply.content and "Euler a" in reply.content
    job = await imagine_bot.queued_job(await imagine_bot.imagine(w.alice, prompt="x", seed=1))
    request = job.job.request
    assert (request.steps, request.width, request.scheduler) == (6, 128, "Euler a")
    assert request.negative_prompt == "blurry"
    job = await imagine_bot.queued_job(
        await imagine_bot.imagine(w.alice, prompt="x", seed=1, steps=3, width=64)
    )
    assert (job.job.request.steps, job.job.request.width) == (3, 64)
    bad = await w.fake.slash_command(w.alice, w.channel, "settings", {"width": 100})
    refused = await bad.wait_response()
    assert "`width`" in refused.content and "not changed" in refused.content
    other = await imagine_bot.queued_job(await imagine_bot.imagine(w.bob, prompt="x", seed=1))
    assert other.job.request.steps == 4  # the server default, untouched by alice's settings


async def test_private_delivery(discord_world, imagine_bot):
    w = discord_world
    await (
        await w.fake.slash_command(w.alice, w.channel, "settings", {"private": True})
    ).wait_response()
    inter = await imagine_bot.imagine(w.alice, prompt="secret", seed=1)
    assert (await inter.wait_response()).ephemeral
    assert (await inter.wait_followup()).ephemeral


async def test_dry_run_then_confirm_admits_exactly_one_job(discord_world, imagine_bot):
    w = discord_world
    long_prompt = " ".join(["castle"] * 30)  # 180 tokens of the tiny model: 3 chunks
    inter = await imagine_bot.imagine(w.alice, prompt=long_prompt, seed=8, count=2, preview=True)
    shown = await inter.wait_response()
    assert shown.ephemeral and "Dry run" in shown.content
    assert "Seeds 8, 9" in shown.content
    assert "Cost: 2 images × 64×64 × 4 steps = 0.005 units" in shown.content
    assert "3 of 4 chunks" in shown.content
    assert await imagine_bot.store.read(jobs.count) == 0
    panel = await inter.original()
    confirm = next(c for row in panel.components for c in row["components"])
    pressed = await w.fake.click_button(w.alice, panel, confirm["custom_id"])
    queued = await pressed.wait_response()
    assert queued.content.startswith("Queued as job #")
    job_id = job_id_of(queued.content)
    panel = await inter.wait_original(lambda m: not m.components)
    assert f"Confirmed as job #{job_id}" in panel.content
    with pytest.raises(LookupError):  # the button is gone: it cannot admit a second job
        await w.fake.click_button(w.alice, panel, confirm["custom_id"])
    await imagine_bot.wait_idle()
    with sqlite3.connect(imagine_bot.service.settings.database_path) as raw:
        assert raw.execute("SELECT COUNT(*), MIN(seed) FROM jobs").fetchone() == (1, 8)


async def test_a_deleted_status_message_is_left_alone_and_the_result_still_arrives(
    discord_world, slow_bot
):
    w = discord_world
    inter = await slow_bot.imagine(w.alice, prompt="a bridge", seed=6, steps=14)
    await inter.wait_original(lambda m: "generating" in m.content, timeout=20)
    w.fake._state.delete_message(await inter.original())  # a moderator removed it
    result = await inter.wait_followup(timeout=30)
    assert result.attachments[0].filename == "seed-6.png"
    await slow_bot.wait_idle()
    assert (await slow_bot.store.read(jobs.get, job_id_of(result.content))).job.status == "done"
    assert slow_bot.bot.status_board.statuses == {}
    edits_after = [
        r
        for r in w.fake.requests
        if r.method == "PATCH" and r.path.endswith("@original") and r.status == 404
    ]
    assert len(edits_after) <= 1  # one refused edit, then the bot stops trying


async def test_cancel_works_after_a_restart(discord_world, settings, held_runner):
    w = discord_world
    held_runner.hold()
    quick_exit = replace(settings, shutdown_grace=0.1)
    async with running_bot(w.fake, quick_exit, runner=held_runner) as bot:
        await bot.imagine(w.bob, prompt="running when stopped", seed=1)
        await held_runner.wait_calls(1)
        inter = await bot.imagine(w.alice, prompt="waiting", seed=2, width=128)
        job_id = job_id_of((await inter.wait_response()).content)
        status = await inter.original()
    held_runner.release()
    identified = len(w.fake.identifies)
    held_runner.hold()
    async with running_bot(w.fake, settings, runner=held_runner) as bot:
        await w.fake.wait_until(lambda: len(w.fake.identifies) > identified or None)
        pressed = await w.fake.click_button(w.alice, status, f"cancel:{job_id}")
        reply = await pressed.wait_response()
        assert "cancelled" in reply.content
        record = await bot.store.read(jobs.get, job_id)
        assert record.job.status == "cancelled"
        assert (
            await bot.store.read(quotas.status, w.guild.id, w.alice.id, default_limit=9)
        ).used == 0
        held_runner.release()


async def test_a_failing_status_edit_is_logged_with_its_job_and_the_others_go_on(
    discord_world, imagine_bot, held_runner, caplog
):
    w = discord_world
    held_runner.hold()
    first = await imagine_bot.imagine(w.alice, prompt="first", seed=1)
    second = await imagine_bot.imagine(w.bob, prompt="second", seed=2)
    first_id = job_id_of((await first.wait_response()).content)
    second_id = job_id_of((await second.wait_response()).content)
    board = imagine_bot.bot.status_board
    await asyncio.sleep(0.5)  # admission marks the status shown just after answering

    async def broken(**fields):
        raise RuntimeError("the edit blew up")

    board.statuses[first_id].edit = broken
    board.set_detail(first_id, "moved along")
    board.set_detail(second_id, "moved along")
    await second.wait_original(lambda m: "moved along" in m.content)
    assert any(f"job {first_id}" in r.getMessage() and r.exc_info for r in caplog.records), (
        "the failed edit was not logged with its job"
    )
    held_runner.release()
    await imagine_bot.wait_idle()


async def mod(world, who, *subcommands, **options):
    inter = await world.fake.slash_command(
        who, world.channel, "mod", options, subcommands=subcommands
    )
    return await inter.wait_response()


async def test_jobs_a_moderator_cancels_end_their_status_messages(
    discord_world, imagine_bot, held_runner
):
    """/mod queue clear and /mod ban cancel queued jobs: their members see it on the status
    message, and the status board lets go of them."""
    w = discord_world
    board = imagine_bot.bot.status_board
    held_runner.hold()
    await imagine_bot.imagine(w.mod, prompt="running", seed=1)
    await held_runner.wait_calls(1)
    cleared = await imagine_bot.imagine(w.alice, prompt="cleared", seed=2, width=128)
    banned = await imagine_bot.imagine(w.bob, prompt="banned", seed=3, width=128)
    cleared_id = job_id_of((await cleared.wait_response()).content)
    banned_id = job_id_of((await banned.wait_response()).content)

    answer = await mod(w, w.mod, "queue", "clear", member=w.alice)
    assert "Cancelled and refunded 1" in answer.content
    status = await cleared.wait_original(lambda m: "cancelled by a moderator" in m.content)
    assert "refunded" in status.content and not status.components
    assert cleared_id not in board.statuses and banned_id in board.statuses

    await mod(w, w.mod, "ban", member=w.bob)
    status = await banned.wait_original(lambda m: "cancelled by a moderator" in m.content)
    assert not status.components and banned_id not in board.statuses
    held_runner.release()
    await imagine_bot.wait_idle()
    assert set(board.statuses) == set()


async def test_forget_me_ends_the_status_of_the_jobs_it_deletes(
    discord_world, imagine_bot, held_runner
):
    w = discord_world
    held_runner.hold()
    await imagine_bot.imagine(w.bob, prompt="running", seed=1)
    await held_runner.wait_calls(1)
    queued = await imagine_bot.imagine(w.alice, prompt="queued", seed=2, width=128)
    job_id = job_id_of((await queued.wait_response()).content)
    asked = await w.fake.slash_command(w.alice, w.channel, "forget-me")
    await asked.wait_response()
    confirmed = await w.fake.click_button(
        w.alice, await asked.original(), f"forget-me:{w.alice.id}"
    )
    assert "deleted 1 job(s)" in (await confirmed.wait_response()).content
    status = await queued.wait_original(lambda m: "deleted your data" in m.content)
    assert "queued" not in status.content and not status.components
    assert job_id not in imagine_bot.bot.status_board.statuses
    held_runner.release()
    await imagine_bot.wait_idle()


def message_bodies(fake):
    """The JSON of every message the bot created or edited (responses, follow-ups, posts)."""
    for request in fake.requests:
        body = request.body
        if request.method not in ("POST", "PATCH") or not isinstance(body, dict):
            continue
        body = body.get("payload_json", body)
        if request.path.endswith("/callback"):
            body = body.get("data") or {}
        if "content" in body:
            yield request.path, body


async def test_the_bot_pings_only_the_member_a_result_is_for(discord_world, imagine_bot):
    w = discord_world
    inter = await imagine_bot.imagine(w.alice, prompt="@everyone <@&1> look", seed=1)
    result = await inter.wait_followup()
    shown = await mod(w, w.mod, "quota", "show", member=w.bob)
    assert f"<@{w.bob.id}>" in shown.content
    await imagine_bot.wait_idle()
    bodies = list(message_bodies(w.fake))
    assert bodies
    for path, body in bodies:
        allowed = body.get("allowed_mentions")
        assert allowed is not None and allowed["parse"] == [], (path, body)
        assert set(allowed.get("users", [])) <= {str(w.alice.id), w.alice.id}, (path, body)
    assert [b["allowed_mentions"].get("users") for _, b in bodies if "job #" in b["content"]][
        -1
    ] in ([str(w.alice.id)], [w.alice.id])
    assert result.content.startswith(f"<@{w.alice.id}> job #")
