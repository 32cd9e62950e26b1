"""The real `python -m bot` as a child process against the fake Discord: start-up, /imagine,
the gateway heartbeat during a long batch, SIGTERM, and a bad setting.

One bot process serves the module (imports alone take several seconds); the SIGTERM test
stops it, so it comes last."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import pytest_asyncio
from factories import pixels
from fakediscord import FakeDiscord
from harness.answers import attachment_names, job_id_of
from harness.child_process import BotProcess, run_bot_command
from harness.in_process import build_world

from bot.db import Store, members
from bot.images import read_parameters

pytestmark = pytest.mark.asyncio(loop_scope="module")

HEARTBEAT_MS = 300
HEARTBEAT = HEARTBEAT_MS / 1000
# Four 256×256 images at 20 steps: a batch of about 3-4 s on one CPU thread.
LONG_JOB = {"count": 4, "width": 256, "height": 256, "steps": 20}


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def fake():
    async with FakeDiscord(heartbeat_interval_ms=HEARTBEAT_MS) as fake:
        yield fake
    if fake.problems():
        pytest.fail("fake Discord saw problems:\n" + "\n".join(fake.problems()), pytrace=False)


@pytest.fixture(scope="module")
def world(fake):
    return build_world(fake)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def bot_process(fake, world, model_cache, tmp_path_factory):
    process = BotProcess.start(
        fake,
        model_cache,
        tmp_path_factory.mktemp("bot-process"),
        MAX_SIZE="256",
        SHUTDOWN_GRACE="120",  # the SIGTERM test expects the running batch to finish
    )
    try:
        await process.wait_ready(fake)
        yield process
    finally:
        process.kill()
        print(f"---- bot log ({process.log_path}) ----\n{process.log()}")


async def test_the_process_connects_and_answers_imagine(fake, world, bot_process):
    assert fake.identifies[0]["token"] == fake.token
    inter = await fake.slash_command(world.alice, world.channel, "imagine", {"prompt": "a fox"})
    response = await inter.wait_response(3)
    assert response.at - inter.dispatched_at < 3 and "Queued as job #" in response.content

    followup = await inter.wait_followup(1, timeout=60)
    [name] = attachment_names(followup)
    assert name.startswith("seed-") and name.endswith(".png")
    image = pixels(followup.attachments[0])
    assert image.shape == (64, 64, 3) and np.ptp(image) > 0
    assert fake.token not in bot_process.log()


async def test_heartbeats_keep_time_and_commands_are_answered_during_a_long_batch(
    fake, world, bot_process
):
    long = await fake.slash_command(
        world.alice, world.channel, "imagine", {"prompt": "a slow mountain", **LONG_JOB}
    )
    started = (await long.wait_response(3)).at
    await asyncio.sleep(4 * HEARTBEAT)  # well inside the batch
    quick = await fake.slash_command(world.bob, world.channel, "imagine", {"prompt": "a quick cat"})
    acknowledged = await quick.wait_response(3)
    assert acknowledged.at - quick.dispatched_at < 3

    result = await long.wait_followup(1, timeout=120)
    assert acknowledged.at < result.at, "the long batch ended before the second command"
    assert attachment_names(result)[0] == "grid.png" and len(result.attachments) == 5
    ended = result.at
    assert ended - started > 6 * HEARTBEAT, "the batch was too short to tell anything"
    beats = [at for at in fake.heartbeats if started <= at <= ended]
    gaps = np.diff([started, *beats, ended])
    assert gaps.max() <= 2 * HEARTBEAT, f"heartbeat gaps {np.round(gaps, 2).tolist()}"
    await quick.wait_followup(1, timeout=60)


async def test_sigterm_finishes_the_running_batch_then_exits_cleanly(fake, world, bot_process):
    running = await fake.slash_command(
        world.alice, world.channel, "imagine", {"prompt": "a last mountain", **LONG_JOB}
    )
    running_id = job_id_of((await running.wait_response(3)).content)
    waiting = await fake.slash_command(world.bob, world.channel, "imagine", {"prompt": "after"})
    waiting_id = job_id_of((await waiting.wait_response(3)).content)
    await bot_process.wait_job(running_id, "running")

    bot_process.terminate()
    await bot_process.wait_log("shutting down")
    late = await fake.slash_command(world.mod, world.channel, "imagine", {"prompt": "too late"})
    refusal = await late.wait_response(3)
    assert refusal.ephemeral and "restart" in refusal.content.lower()

    result = await running.wait_followup(1, timeout=120)
    assert len(result.attachments) == 5
    assert await bot_process.wait_exit(30) == 0
    assert (await fake.wait_for_close(5)).by_client
    await bot_process.wait_log("stopped", 1)
    assert (await bot_process.job(running_id)).job.status == "done"
    assert (await bot_process.job(waiting_id)).job.status == "queued"  # for the next start
    assert waiting.followup_ids == []


async def test_generate_writes_the_png_the_bot_would_post(fake, model_cache, tmp_path):
    """The README's `python -m bot generate`: the same queue, executor and pixels as the bot."""
    done = await asyncio.to_thread(
        run_bot_command, fake, model_cache, tmp_path,
        "generate", "photo of a panda surfing", "--seed", "42", "--out", "panda.png",
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    png = (tmp_path / "panda.png").read_bytes()
    parameters = read_parameters(png)
    assert parameters["prompt"] == "photo of a panda surfing" and parameters["seed"] == 42
    store = await Store.open(tmp_path / "bot.sqlite3")
    try:
        (record,) = await store.read(members.history, 0)  # the command line runs as member 0
    finally:
        await store.close()
    assert record.job.status == "done" and record.job.request.seed == 42
    assert record.error is None and record.finished_at is not None


async def test_an_invalid_setting_exits_2_with_one_line_naming_it(fake, model_cache, tmp_path):
    done = await asyncio.to_thread(run_bot_command, fake, model_cache, tmp_path, DEVICE="tpu")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "DEVICE" in lines[0], done.stderr


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"MODEL_ID": "/nowhere/sd-model"}, "error: Model '/nowhere/sd-model' is not available"),
        ({"DISCORD_TOKEN": "not-the-token"}, "error: Discord refused DISCORD_TOKEN"),
        ({"DISCORD_API_BASE": "http://127.0.0.1:9/api/v10"}, "error: cannot reach Discord at"),
    ],
)
async def test_start_up_failures_end_with_one_clear_line(
    fake, model_cache, tmp_path, overrides, expected
):
    done = await asyncio.to_thread(run_bot_command, fake, model_cache, tmp_path, **overrides)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(expected), done.stderr
    assert "Traceback" not in done.stderr
