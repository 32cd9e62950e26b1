"""A FLUX model beside SD through the fake Discord: the allowlist holds the built-ins `tiny` and
`tiny-flux`; /models names each one's family, /imagine on the FLUX entry delivers a PNG naming
it, two members' jobs share one call with the seed-5 image as it is made alone, and an SD
scheduler on the FLUX entry is refused with nothing queued."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from factories import pixels
from harness.answers import job_id_of
from harness.in_process import HeldRunner, allowlist_file, allowlist_runner, held_bot

from bot.db import jobs
from bot.images import read_parameters

MODELS_TOML = """
default = "tiny"

[models.tiny]
source = "tiny"
description = "SD 1.x at toy size"

[models.flux]
source = "tiny-flux"
description = "FLUX.1 at toy size"
steps = 2
guidance = 3.5
"""


@pytest.fixture(scope="module")
def models_file(tmp_path_factory):
    return allowlist_file(tmp_path_factory.mktemp("allowlist"), MODELS_TOML)


@pytest.fixture(scope="module")
def flux_runner(model_cache, models_file):
    return allowlist_runner(model_cache, models_file, ("tiny", "flux"))


@pytest.fixture
async def flux_bot(discord_world, settings, models_file, flux_runner):
    settings = replace(settings, models_file=models_file)
    async with held_bot(discord_world.fake, settings, HeldRunner(flux_runner)) as running:
        yield running


async def delivered(inter):
    """The job's id and the pixels and parameters of its first PNG."""
    job_id = job_id_of((await inter.wait_response()).content)
    result = await inter.wait_followup(timeout=30)
    png = result.attachments[0]
    return job_id, pixels(png), read_parameters(png.data)


async def test_models_lists_both_families(discord_world, flux_bot):
    w = discord_world
    answer = await (await w.fake.slash_command(w.alice, w.channel, "models")).wait_response()
    lines = answer.content.splitlines()
    flux = next(i for i, line in enumerate(lines) if line.startswith("• **flux**"))
    assert lines[flux + 1].startswith("  FLUX.1 · 2 steps") and "Flow Euler" in lines[flux + 1]
    tiny = next(i for i, line in enumerate(lines) if line.startswith("• **tiny**"))
    assert lines[tiny + 1].startswith("  SD 1.x/2.x · ") and "DPM++ 2M" in lines[tiny + 1]


async def test_flux_jobs_of_two_members_share_a_call_and_keep_their_seed(discord_world, flux_bot):
    w, runner = discord_world, flux_bot.runner
    options = {"prompt": "a lighthouse", "model": "flux", "seed": 5}
    alone_id, alone, parameters = await delivered(await flux_bot.imagine(w.alice, **options))
    assert parameters["model"] == "flux" and parameters["sampler"] == "Flow Euler"
    assert alone.shape == (64, 64, 3) and alone.std() > 1
    await flux_bot.wait_idle()

    runner.hold()
    blocker = await flux_bot.imagine(w.mod, prompt="hold on", seed=1, steps=2)
    await runner.wait_calls(2)
    alice = await flux_bot.imagine(w.alice, **options)
    bob = await flux_bot.imagine(w.bob, prompt="a harbour at night", model="flux", seed=9)
    runner.release()
    alice_id, batched, _ = await delivered(alice)
    bob_id, other, _ = await delivered(bob)
    await blocker.wait_followup(timeout=30)
    await flux_bot.wait_idle()

    records = [await flux_bot.store.read(jobs.get, i) for i in (alone_id, alice_id, bob_id)]
    assert records[1].job.batch_id == records[2].job.batch_id != records[0].job.batch_id
    key, specs = runner.calls[-1]
    assert key.model == "flux" and sorted(s.seed for s in specs) == [5, 9]
    assert np.abs(batched - alone).max() <= 1
    assert np.abs(other - alone).mean() > 1


async def test_an_sd_scheduler_on_the_flux_entry_is_refused_with_nothing_queued(
    discord_world, flux_bot
):
    inter = await flux_bot.imagine(
        discord_world.alice, prompt="a cat", model="flux", scheduler="DPM++ 2M"
    )
    response = await inter.wait_response()
    assert response.ephemeral and "`scheduler`" in response.content
    assert "DPM++ 2M does not apply to flux, a FLUX.1 model" in response.content
    assert "Flow Euler" in response.content
    assert await flux_bot.store.read(jobs.count) == 0
    assert flux_bot.runner.calls == []


async def press(w, bot, member, message, custom_id):
    """Click a result's button; (the new job's record, its delivered pixels)."""
    click = await w.fake.click_button(member, message, custom_id)
    job_id = job_id_of((await click.wait_original(lambda m: "job #" in m.content)).content)
    result = await click.wait_followup(timeout=30)
    await bot.wait_idle()
    return await bot.store.read(jobs.get, job_id), pixels(result.attachments[0]).astype(int)


async def test_vary_upscale_and_zoom_out_work_on_a_flux_result(discord_world, flux_bot):
    w = discord_world
    inter = await flux_bot.imagine(w.alice, prompt="a mill", model="flux", seed=3, steps=4)
    parent_id = job_id_of((await inter.wait_response()).content)
    result = await inter.wait_followup(timeout=30)
    parent = pixels(result.attachments[0]).astype(int)
    await flux_bot.wait_idle()

    varied, image = await press(w, flux_bot, w.bob, result, f"vary:{parent_id}:0:strong")
    assert (varied.job.request.model, varied.job.request.mode) == ("flux", "image")
    assert image.shape == (64, 64, 3) and np.abs(image - parent).mean() > 1

    upscaled, image = await press(w, flux_bot, w.bob, result, f"op:{parent_id}:0:upscale-subtle")
    assert (upscaled.job.request.model, upscaled.job.request.mode) == ("flux", "image")
    assert image.shape == (128, 128, 3)

    zoomed, image = await press(w, flux_bot, w.alice, result, f"op:{parent_id}:0:zoom-2")
    request = zoomed.job.request
    assert (request.model, request.mode, request.keep_box) == ("flux", "inpaint", (32, 32, 96, 96))
    assert image.shape == (128, 128, 3)
    assert np.array_equal(image[32 + 16 : 96 - 16, 32 + 16 : 96 - 16], parent[16:-16, 16:-16])
    modes = [key.mode for key, _ in flux_bot.runner.calls[-3:]]
    assert modes == ["image", "image", "inpaint"]
    assert all(key.scheduler == "Flow Euler" for key, _ in flux_bot.runner.calls)
