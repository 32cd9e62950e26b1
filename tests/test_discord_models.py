"""Models and LoRAs from the owner's allowlist, through the fake Discord: /imagine's `model:`
and `lora:` (autocomplete, refusals), /models, variations that keep their parent's model and
LoRAs, and the result showing both. The allowlist holds the built-ins `tiny`, `tiny-sdxl` and
`tiny-lora`; one runner (both models loaded once) serves every test of the module."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import replace

import numpy as np
import pytest
from conftest import TEST_LIMITS
from factories import pixels
from harness.answers import embed_field, job_id_of
from harness.in_process import HeldRunner, allowlist_file, allowlist_runner, held_bot, running_bot
from PIL import Image

from bot.db import jobs, members
from bot.db.members import MemberDefaults
from bot.images import read_parameters
from bot.models import Catalog, ModelEntry, load_catalog
from bot.requests import RawOptions
from bot.service import saved_defaults
from cogs.models import model_choices, models_text
from cogs.sources import raw_from_parameters

MODELS_TOML = """
default = "tiny"

[models.tiny]
source = "tiny"
description = "SD 1.x at toy size"

[models.tiny-sdxl]
source = "tiny-sdxl"
description = "SDXL at toy size, two text encoders"
steps = 3

[loras.tiny-lora]
source = "tiny-lora"
models = ["tiny"]
description = "A toy LoRA"
"""


@pytest.fixture(scope="module")
def models_file(tmp_path_factory):
    return allowlist_file(tmp_path_factory.mktemp("allowlist"), MODELS_TOML)


@pytest.fixture(scope="module")
def models_runner(model_cache, models_file):
    """The real runner on the allowlist, with both models loaded once for the module."""
    return allowlist_runner(model_cache, models_file, ("tiny", "tiny-sdxl"))


@pytest.fixture
async def models_bot(discord_world, settings, models_file, models_runner):
    """The bot on the allowlist (MODELS_FILE), its runner behind a gate."""
    settings = replace(settings, models_file=models_file)
    async with held_bot(discord_world.fake, settings, HeldRunner(models_runner)) as running:
        yield running


async def result_of(bot, member, **options):
    """Run /imagine; (the job's record once done, its result message)."""
    inter = await bot.imagine(member, **options)
    job_id = job_id_of((await inter.wait_response()).content)
    result = await inter.wait_followup(timeout=30)
    await bot.wait_idle()
    return await bot.store.read(jobs.get, job_id), result


async def test_two_models_queued_together_run_in_separate_calls_and_both_deliver(
    discord_world, models_bot
):
    w, runner = discord_world, models_bot.runner
    runner.hold()
    blocker = await models_bot.imagine(w.mod, prompt="hold on", seed=1, steps=2)
    await runner.wait_calls(1)
    options = {"prompt": "a lighthouse", "seed": 5, "steps": 2}
    sdxl = await models_bot.imagine(w.alice, model="tiny-sdxl", **options)
    tiny = await models_bot.imagine(w.bob, model="tiny", **options)
    for inter in (sdxl, tiny):
        assert "Queued as job #" in (await inter.wait_response()).content
    runner.release()
    await models_bot.wait_idle()

    assert [(key.model, len(specs)) for key, specs in runner.calls[1:]] in (
        [("tiny-sdxl", 1), ("tiny", 1)],
        [("tiny", 1), ("tiny-sdxl", 1)],
    )
    delivered = {}
    for inter, model in ((sdxl, "tiny-sdxl"), (tiny, "tiny")):
        result = await inter.wait_followup(timeout=30)
        assert embed_field(result, "Model") == model and embed_field(result, "LoRAs") is None
        assert read_parameters(result.attachments[0].data)["model"] == model
        delivered[model] = pixels(result.attachments[0])
        assert delivered[model].shape == (64, 64, 3)
    assert np.abs(delivered["tiny"] - delivered["tiny-sdxl"]).mean() > 1
    await blocker.wait_followup(timeout=30)

    listing = await w.fake.slash_command(w.alice, w.channel, "models")
    answer = await listing.wait_response()
    assert answer.ephemeral
    lines = answer.content.splitlines()
    sdxl_line = next(i for i, line in enumerate(lines) if line.startswith("• **tiny-sdxl**"))
    assert lines[sdxl_line].endswith("SDXL at toy size, two text encoders · loaded now")
    assert "3 steps" in lines[sdxl_line + 1]
    assert any(line.startswith("• **tiny** —") and "loaded now" in line for line in lines)
    assert "• **tiny-lora** — A toy LoRA · for tiny" in lines


@pytest.mark.parametrize(
    ("options", "option", "named"),
    [
        ({"model": "sd99"}, "model", "tiny, tiny-sdxl"),
        ({"model": "tiny-sdxl", "lora": "tiny-lora:0.5"}, "lora", "tiny-sdxl takes no LoRAs"),
        ({"lora": "tiny-lora:2.5"}, "lora", "from -2 to 2"),
        ({"lora": "pixel-art"}, "lora", "choose from: tiny-lora"),
    ],
    ids=["unknown-model", "lora-for-another-model", "weight-out-of-range", "unknown-lora"],
)
async def test_a_bad_model_or_lora_is_refused_privately_with_no_job(
    discord_world, models_bot, options, option, named
):
    inter = await models_bot.imagine(discord_world.alice, prompt="a cat", **options)
    response = await inter.wait_response()
    assert response.type == 4 and response.ephemeral
    assert f"`{option}`" in response.content and named in response.content
    assert await models_bot.store.read(jobs.count) == 0
    assert models_bot.runner.calls == [] and inter.followup_ids == []


async def test_autocomplete_offers_the_allowlist(discord_world, models_bot):
    w = discord_world

    async def choices(focused, **typed):
        options = {"prompt": "a cat", **typed}
        inter = await w.fake.autocomplete(w.alice, w.channel, "imagine", options, focused)
        return await inter.wait_choices()

    assert await choices("model") == [
        {"name": "tiny — SD 1.x at toy size", "value": "tiny"},
        {"name": "tiny-sdxl — SDXL at toy size, two text encoders", "value": "tiny-sdxl"},
    ]
    assert [c["value"] for c in await choices("model", model="XL")] == ["tiny-sdxl"]
    assert [c["value"] for c in await choices("model", model="two encoders")] == []
    assert await choices("model", model="x" * 5000) == []  # bounded: nothing to match
    assert await choices("lora", model="tiny", lora="ti") == [
        {"name": "tiny-lora:1 — A toy LoRA", "value": "tiny-lora:1"}
    ]
    assert [c["value"] for c in await choices("lora", lora="tiny-lora:0.4")] == ["tiny-lora:0.4"]
    assert await choices("lora", model="tiny-sdxl", lora="") == []
    assert await models_bot.store.read(jobs.count) == 0


async def test_a_lora_shows_on_the_result_its_png_the_dry_run_and_a_reroll(
    discord_world, models_bot
):
    w = discord_world
    preview = await models_bot.imagine(
        w.alice, prompt="a fox", seed=3, lora="tiny-lora:0.5", preview=True
    )
    dry_run = (await preview.wait_response()).content
    assert "Model tiny · LoRAs tiny-lora:0.5" in dry_run

    record, result = await result_of(
        models_bot, w.alice, prompt="a fox", seed=3, steps=2, lora="tiny-lora:0.5"
    )
    assert record.job.request.loras == (("tiny-lora", 0.5),)
    assert (embed_field(result, "Model"), embed_field(result, "LoRAs")) == ("tiny", "tiny-lora:0.5")
    parameters = read_parameters(result.attachments[0].data)
    assert parameters["model"] == "tiny"
    assert tuple(parameters["loras"]) == (("tiny-lora", 0.5),)

    reroll = await w.fake.click_button(w.bob, result, f"reroll:{record.job.id}")
    rerolled = await models_bot.store.read(
        jobs.get, job_id_of((await reroll.wait_response()).content)
    )
    assert rerolled.job.request.loras == (("tiny-lora", 0.5),)
    assert rerolled.job.request.model == "tiny"
    await models_bot.wait_idle()


async def test_a_variation_of_a_tiny_sdxl_result_stays_tiny_sdxl(discord_world, models_bot):
    w = discord_world
    parent, result = await result_of(
        models_bot, w.alice, prompt="a harbour", seed=8, steps=3, model="tiny-sdxl"
    )
    press = await w.fake.click_button(w.bob, result, f"vary:{parent.job.id}:0:strong")
    job_id = job_id_of((await press.wait_original()).content)
    varied = await press.wait_followup(timeout=30)
    await models_bot.wait_idle()
    record = await models_bot.store.read(jobs.get, job_id)
    assert (record.job.request.model, record.job.request.mode) == ("tiny-sdxl", "image")
    assert embed_field(varied, "Model") == "tiny-sdxl"
    assert models_bot.runner.calls[-1][0].model == "tiny-sdxl"

    # The same image's PNG parameters, posted by a member, say tiny-sdxl too.
    posted = await w.fake.send_message(
        w.alice, w.channel, "", attachments=[("mine.png", result.attachments[0].data)]
    )
    menu = await w.fake.message_command(w.alice, w.channel, "Vary", posted)
    again = await models_bot.store.read(jobs.get, job_id_of((await menu.wait_original()).content))
    assert again.job.request.model == "tiny-sdxl"
    await models_bot.wait_idle()


async def test_a_reply_with_model_and_lora_flags_switches_them(discord_world, models_bot):
    """A reply keeps the parent's model and LoRAs unless its flags say otherwise: `--model`
    alone drops LoRAs chosen for the parent's model; `--lora` picks new ones."""
    w = discord_world
    _, result = await result_of(
        models_bot, w.alice, prompt="a barn", seed=4, steps=2, lora="tiny-lora:0.5"
    )

    async def reply(text):
        mine = await w.fake.send_message(w.bob, w.channel, text, reply_to=result)
        status = await w.fake.wait_for_message(
            lambda m: m.reference == mine.id and "job #" in m.content
        )
        return (await models_bot.store.read(jobs.get, job_id_of(status.content))).job.request

    switched = await reply("a barn at dusk --model tiny-sdxl")
    assert (switched.model, switched.loras) == ("tiny-sdxl", ())
    reweighted = await reply("a barn at dusk --lora tiny-lora:1.5")
    assert (reweighted.model, reweighted.loras) == ("tiny", (("tiny-lora", 1.5),))
    kept = await reply("..")
    assert (kept.model, kept.loras) == ("tiny", (("tiny-lora", 0.5),))
    wrong = await w.fake.send_message(
        w.bob, w.channel, "a barn --model tiny-sdxl --lora tiny-lora", reply_to=result
    )
    refusal = await w.fake.wait_for_message(lambda m: m.reference == wrong.id)
    assert "tiny-lora" in refusal.content and "Nothing was queued" in refusal.content
    await models_bot.wait_idle()


def test_an_images_parameters_keep_only_what_the_allowlist_has(models_file):
    catalog = load_catalog(models_file, "tiny")

    def kept(model, loras):
        raw = raw_from_parameters({"prompt": "a fox", "model": model, "loras": loras}, catalog)
        return raw.model, raw.loras

    assert kept("tiny", [("tiny-lora", 0.5)]) == ("tiny", (("tiny-lora", 0.5),))
    # Another tool's PNG: its model is not ours (the default draws), nor its LoRA.
    assert kept("v1-5-pruned", [("detail", 1.0)]) == (None, None)
    assert kept("v1-5-pruned", [("tiny-lora", 1.0)]) == (None, (("tiny-lora", 1.0),))
    # A LoRA for tiny on a tiny-sdxl image does not fit: dropped rather than refused.
    assert kept("tiny-sdxl", [("tiny-lora", 0.5)]) == ("tiny-sdxl", None)
    # A Zoom Out painted by tiny's fill-only inpainting model: tiny draws its variations.
    painted = dataclasses.replace(
        catalog,
        models={
            **catalog.models,
            "tiny": dataclasses.replace(catalog.models["tiny"], inpaint="tiny-inpaint"),
            "tiny-inpaint": ModelEntry("tiny-inpaint", "tiny-inpaint"),
        },
    )
    raw = raw_from_parameters({"prompt": "a fox", "model": "tiny-inpaint"}, painted)
    assert raw.model == "tiny"


def test_autocomplete_and_models_stay_within_discords_limits():
    models = {f"m{i:02}": ModelEntry(f"m{i:02}", f"m{i:02}", "x" * 150) for i in range(40)}
    catalog = Catalog("m39", models)
    choices = model_choices(catalog, "m")
    assert len(choices) == 25 and choices[0].value == "m39"  # the default first
    assert all(len(choice.name) <= 100 for choice in choices)
    assert [c.value for c in model_choices(catalog, "3")][:3] == ["m39", "m03", "m13"]
    text = models_text(catalog, TEST_LIMITS, frozenset({"m00"}))
    assert len(text) <= 2000 and text.endswith("more.")


async def test_a_members_default_model_from_settings(discord_world, models_bot, models_file):
    """/settings model: is offered by autocomplete, checked like /imagine's, and draws a
    member's /imagine when they name no model; naming one still wins."""
    w = discord_world

    async def settings(**options):
        inter = await w.fake.slash_command(w.alice, w.channel, "settings", options)
        return await inter.wait_response()

    typed = await w.fake.autocomplete(w.alice, w.channel, "settings", {"model": "xl"}, "model")
    assert [c["value"] for c in await typed.wait_choices()] == ["tiny-sdxl"]
    saved = await settings(model="tiny-sdxl")
    assert "model: tiny-sdxl" in saved.content and saved.ephemeral
    record, result = await result_of(models_bot, w.alice, prompt="a fox", seed=5)
    assert record.job.request.model == "tiny-sdxl" and embed_field(result, "Model") == "tiny-sdxl"
    assert record.job.request.steps == 3  # the model's own default, as for model:tiny-sdxl
    record, _ = await result_of(models_bot, w.alice, prompt="a fox", seed=5, model="tiny")
    assert record.job.request.model == "tiny"

    refused = await settings(model="nope")
    assert "there is no model 'nope'; choose one of: tiny, tiny-sdxl" in refused.content
    assert "Your defaults were not changed" in refused.content and refused.ephemeral
    assert (await models_bot.store.read(members.defaults, w.alice.id)).model == "tiny-sdxl"
    # Another member's /imagine is untouched by Alice's default.
    record, _ = await result_of(models_bot, w.bob, prompt="a fox", seed=5)
    assert record.job.request.model == "tiny"


def test_a_saved_model_the_owner_no_longer_offers_gives_way_to_the_default(models_file):
    """Saved defaults are never refused later: a model taken off the allowlist (or not yet
    fetched) is skipped, and the server's default draws."""
    catalog = load_catalog(models_file, "tiny")
    saved = MemberDefaults(model="tiny-sdxl", steps=30)
    assert saved_defaults(RawOptions("a fox"), saved, catalog).model == "tiny-sdxl"
    assert saved_defaults(RawOptions("a fox"), saved, catalog).steps is None  # the model's own
    assert saved_defaults(RawOptions("a fox", model="tiny"), saved, catalog).steps == 30
    fetched_later = dataclasses.replace(catalog, missing={"tiny-sdxl"})
    assert saved_defaults(RawOptions("a fox"), saved, fetched_later).model is None
    removed = MemberDefaults(model="gone", steps=30)
    assert saved_defaults(RawOptions("a fox"), removed, catalog) == RawOptions("a fox", steps=30)


SIZED_MODELS_TOML = """
default = "tiny"

[models.tiny]
source = "tiny"

[models.tiny-sdxl]
source = "tiny-sdxl"
steps = 3
width = 128
height = 128
"""


async def test_an_upload_is_drawn_at_the_chosen_models_own_size(
    discord_world, settings, models_runner, tmp_path
):
    """The server draws 64×64 by default and tiny-sdxl 128×128 (its allowlist entry). A
    member's 300×200 upload is drawn at 96×64 on tiny and at 160×104 on tiny-sdxl, each model's
    own area, and a Vary of a tiny-sdxl result stays 128×128, instead of both models drawing
    every upload at the server's area."""
    w = discord_world
    models_file = tmp_path / "models.toml"
    models_file.write_text(SIZED_MODELS_TOML)
    photo = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (200, 300, 3), np.uint8)).save(
        photo, format="PNG"
    )
    runner = HeldRunner(models_runner)
    sized = replace(settings, models_file=models_file)
    async with running_bot(w.fake, sized, runner=runner) as bot:

        async def drawn(member, **options):
            inter = await w.fake.slash_command(
                member, w.channel, "imagine", {"prompt": "a bay", **options},
                attachments={"image": ("photo.png", photo.getvalue())},
            )  # fmt: skip
            job_id = job_id_of((await inter.wait_original()).content)  # deferred first
            result = await inter.wait_followup(timeout=30)
            await bot.wait_idle()
            key, specs = runner.calls[-1]
            assert specs[0].init_image.size == (key.width, key.height)
            record = await bot.store.read(jobs.get, job_id)
            return record.job.request, Image.open(io.BytesIO(result.attachments[0].data)).size

        on_tiny, tiny_size = await drawn(w.alice, model="tiny")
        assert (on_tiny.width, on_tiny.height) == tiny_size == (96, 64)
        on_sdxl, sdxl_size = await drawn(w.bob, model="tiny-sdxl")
        assert (on_sdxl.width, on_sdxl.height) == sdxl_size == (160, 104)
        assert on_tiny.cost < on_sdxl.cost  # charged for the pixels drawn

        parent, result = await result_of(bot, w.alice, prompt="a harbour", model="tiny-sdxl")
        assert (parent.job.request.width, parent.job.request.height) == (128, 128)
        press = await w.fake.click_button(w.bob, result, f"vary:{parent.job.id}:0:strong")
        job_id = job_id_of((await press.wait_original()).content)
        varied = await press.wait_followup(timeout=30)
        await bot.wait_idle()
        record = await bot.store.read(jobs.get, job_id)
        assert (record.job.request.width, record.job.request.height) == (128, 128)
        assert Image.open(io.BytesIO(varied.attachments[0].data)).size == (128, 128)


@pytest.mark.parametrize(
    "hostile",
    ["x" * 5000, "tiny\x00", " ", "@everyone", "tiny-sdxl; DROP TABLE member_defaults", "ᵗⁱⁿʸ"],
)
async def test_settings_refuses_a_hostile_model_name_and_keeps_the_defaults(
    discord_world, models_bot, hostile
):
    """Whatever a member sends as /settings model: (Discord's 64-character bound is not
    trusted: the cog cuts it there too), it is refused privately, within one message, naming
    the allowed models, and nothing is saved."""
    w = discord_world
    inter = await w.fake.slash_command(w.alice, w.channel, "settings", {"model": hostile})
    refused = await inter.wait_response()
    assert refused.ephemeral and len(refused.content) <= 2000
    assert "choose one of: tiny, tiny-sdxl" in refused.content
    assert "Your defaults were not changed" in refused.content
    assert await models_bot.store.read(members.defaults, w.alice.id) == MemberDefaults()
