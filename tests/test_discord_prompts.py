"""The prompt language as a member uses it: long prompts, weights, flags and permutations in
/imagine and in replies, through the real bot against the fake Discord."""

from __future__ import annotations

import io

import numpy as np
from factories import make_request, pixels
from harness.answers import embed_field, job_id_of
from PIL import Image
from test_images import noise

from bot.db import jobs
from bot.images import parameters_text, png_bytes, read_parameters


def words(tokens: int) -> str:
    """Text of `tokens` tiny-model tokens: one per character, spaces free."""
    return " ".join(["word"] * (tokens // 4))


async def delivered(bot, member, **options):
    """/imagine, then (the job record, the result message) once it is done."""
    inter = await bot.imagine(member, **options)
    job_id = job_id_of((await inter.wait_response()).content)
    result = await inter.wait_followup(timeout=30)
    await bot.wait_idle()
    return await bot.store.read(jobs.get, job_id), result


async def refused(bot, member, **options) -> str:
    inter = await bot.imagine(member, **options)
    response = await inter.wait_response(3)
    assert response.type == 4 and response.ephemeral, response.content
    assert await bot.store.read(jobs.count) == 0
    assert bot.runner.calls == [] and inter.followup_ids == []
    return response.content


def results(inter) -> dict[str, np.ndarray]:
    """The delivered images of an interaction's jobs, by the prompt each is labelled with."""
    return {
        m.embeds[0]["description"]: pixels(m.attachments[0])
        for m in inter.followups
        if m.attachments and not m.deleted
    }


async def test_text_after_the_80th_token_changes_the_image(discord_world, imagine_bot):
    w, head = discord_world, words(80)
    fox, fox_result = await delivered(imagine_bot, w.alice, prompt=f"{head} a fox", seed=3)
    owl, owl_result = await delivered(imagine_bot, w.bob, prompt=f"{head} an owl", seed=3)
    assert fox.job.request.prompt.endswith("a fox") and owl.job.request.seed == 3
    difference = np.abs(pixels(fox_result.attachments[0]) - pixels(owl_result.attachments[0]))
    assert difference.mean() > 1


async def test_weights_change_the_image_and_escaped_brackets_are_literal(
    discord_world, imagine_bot
):
    w = discord_world
    images = {}
    for prompt in ("fox", "(fox:1.5)", "(fox)", r"\(fox\)"):
        record, result = await delivered(imagine_bot, w.alice, prompt=prompt, seed=9)
        assert record.job.request.prompt == prompt  # stored as written, weights and all
        images[prompt] = pixels(result.attachments[0])
    assert np.abs(images["fox"] - images["(fox:1.5)"]).mean() > 1
    # `(fox)` weighs the tokens of "fox"; `\(fox\)` draws the brackets: other tokens.
    assert np.abs(images["(fox)"] - images[r"\(fox\)"]).mean() > 1
    assert np.abs(images["fox"] - images[r"\(fox\)"]).mean() > 1


async def test_flags_set_the_size_seed_and_negative_prompt(discord_world, imagine_bot):
    record, result = await delivered(
        imagine_bot, discord_world.alice, prompt="a fox --ar 3:2 --seed 7 --no blur"
    )
    request = record.job.request
    assert (request.prompt, request.seed, request.negative_prompt) == ("a fox", 7, "blur")
    assert (request.width, request.height) == (96, 64)  # 3:2 from the 64×64 default
    image = Image.open(io.BytesIO(result.attachments[0].data))
    assert image.size == (96, 64)
    assert embed_field(result, "Seed") == "7" and embed_field(result, "Negative prompt") == "blur"
    parameters = read_parameters(result.attachments[0].data)
    assert parameters["prompt"] == "a fox" and parameters["negative_prompt"] == "blur"


async def test_no_adds_to_the_members_default_negative_prompt(discord_world, imagine_bot):
    w = discord_world
    options = {"negative_prompt": "ugly"}
    await (await w.fake.slash_command(w.alice, w.channel, "settings", options)).wait_response()
    record, _ = await delivered(imagine_bot, w.alice, prompt="a fox --no blur")
    assert record.job.request.negative_prompt == "ugly, blur"
    record, _ = await delivered(imagine_bot, w.alice, prompt="a fox", negative_prompt="fog")
    assert record.job.request.negative_prompt == "fog"


async def test_permutations_admit_one_job_each_labelled_with_its_prompt(
    discord_world, imagine_bot, tiny_runner
):
    inter = await imagine_bot.imagine(discord_world.alice, prompt="{red,blue} fox", seed=4)
    first = await inter.wait_response(3)
    second = await inter.wait_followup(1)
    assert "Queued as job #" in first.content and "Queued as job #" in second.content
    await imagine_bot.wait_idle()
    records = [await imagine_bot.store.read(jobs.get, job_id) for job_id in (1, 2)]
    assert [r.job.request.prompt for r in records] == ["red fox", "blue fox"]
    assert all(r.job.status == "done" and r.job.request.seed == 4 for r in records)
    assert await imagine_bot.store.read(jobs.count) == 2
    images = results(inter)
    assert set(images) == {"red fox", "blue fox"}
    assert np.abs(images["red fox"] - images["blue fox"]).mean() > 1


async def test_an_unknown_flag_is_refused_privately_listing_the_known_ones(
    discord_world, imagine_bot
):
    text = await refused(imagine_bot, discord_world.alice, prompt="a fox --stylize 200")
    assert "`--stylize`" in text and "--ar" in text and "--repeat" in text


async def test_a_flag_contradicting_an_option_is_refused_naming_both(discord_world, imagine_bot):
    text = await refused(imagine_bot, discord_world.alice, prompt="a fox --seed 7", seed=8)
    assert "`--seed`" in text and "`seed` option says 8" in text


async def test_bad_prompts_are_refused_privately_before_anything_is_queued(
    discord_world, imagine_bot
):
    w = discord_world
    text = await refused(imagine_bot, w.alice, prompt="a (fox in the snow")
    assert "`prompt`" in text and "position 3" in text
    text = await refused(imagine_bot, w.alice, prompt=words(320))
    assert "5 chunks" in text and "at most 4" in text
    text = await refused(imagine_bot, w.alice, prompt="a fox", negative_prompt=words(400))
    assert "`negative_prompt`" in text and "6 chunks" in text
    text = await refused(imagine_bot, w.alice, prompt="{a,b,c} {d,e} fox")
    assert "6 prompt(s)" in text and "at most 4" in text


async def test_dry_run_shows_the_parsed_prompt_and_confirm_admits_every_job(
    discord_world, imagine_bot
):
    w = discord_world
    inter = await imagine_bot.imagine(
        w.alice, prompt="{red,blue} (fox:1.5) --seed 7 --no blur", preview=True
    )
    shown = (await inter.wait_response()).content
    assert "Flags: `--seed 7` `--no blur`" in shown and "fox ×1.5" in shown
    assert "2 jobs" in shown and "1. red (fox:1.5) · 1 of 4 chunks" in shown
    assert "2. blue (fox:1.5)" in shown and "Negative prompt: blur" in shown
    assert "= 0.003 units a job, 0.006 units for all 2" in shown  # 64×64 × 4 steps, twice
    assert await imagine_bot.store.read(jobs.count) == 0
    panel = await inter.original()
    confirm = next(c for row in panel.components for c in row["components"])
    await w.fake.click_button(w.alice, panel, confirm["custom_id"])
    panel = await inter.wait_original(lambda m: not m.components)
    assert "Confirmed as job #1, #2" in panel.content
    await imagine_bot.wait_idle()
    records = [await imagine_bot.store.read(jobs.get, job_id) for job_id in (1, 2)]
    assert [r.job.request.prompt for r in records] == ["red (fox:1.5)", "blue (fox:1.5)"]
    assert all(r.job.request.negative_prompt == "blur" for r in records)


async def test_reply_flags_and_permutations(discord_world, imagine_bot):
    w = discord_world
    _, result = await delivered(imagine_bot, w.alice, prompt="a barn", seed=5, steps=6)
    mine = await w.fake.send_message(
        w.alice, w.channel, "a {red,blue} barn --no fog --strength 0.5", reply_to=result
    )
    await w.fake.wait_for_message(lambda m: m.reference == mine.id and "job #3" in m.content)
    await imagine_bot.wait_idle()
    records = [await imagine_bot.store.read(jobs.get, job_id) for job_id in (2, 3)]
    assert [r.job.request.prompt for r in records] == ["a red barn", "a blue barn"]
    for record in records:
        request = record.job.request
        assert (request.negative_prompt, request.strength, request.steps) == ("fog", 0.5, 6)
        assert record.job.parent_job_id == 1
    refusal = await w.fake.send_message(w.alice, w.channel, "a barn --zoom 2", reply_to=result)
    answer = await w.fake.wait_for_message(lambda m: m.reference == refusal.id)
    assert "`--zoom`" in answer.content and await imagine_bot.store.read(jobs.count) == 3


async def test_vary_from_a_png_reads_the_weighted_prompt_back_unchanged(discord_world, imagine_bot):
    w = discord_world
    prompt = r"a (fox:1.3) in a [hat], \(sketch\) BREAK snow"
    foreign = make_request(prompt=prompt, seed=99, width=64, height=64, model="other")
    upload = png_bytes(noise(64, 64, seed=2), parameters_text(foreign, 99))
    theirs = await w.fake.send_message(w.bob, w.channel, "", attachments=[("fox.png", upload)])
    menu = await w.fake.message_command(w.alice, w.channel, "Vary", theirs)
    job_id = job_id_of((await menu.wait_original()).content)
    await imagine_bot.wait_idle()
    record = await imagine_bot.store.read(jobs.get, job_id)
    assert record.job.request.prompt == prompt
    result = await menu.wait_followup(timeout=30)
    assert read_parameters(result.attachments[0].data)["prompt"] == prompt
