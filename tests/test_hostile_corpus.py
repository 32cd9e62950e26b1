"""Every case of tests/hostile_corpus.py, driven the way a member sends it (prompts, options and
custom ids through the fake Discord, uploads through the intake, models.toml at start-up): each
ends in a clean refusal, with nothing queued or charged, or in a correct result."""

from __future__ import annotations

import sqlite3
import time
import zlib

import pytest
from conftest import with_changes
from harness.in_process import running_bot
from hostile_corpus import BLOCKED_TERMS, CUSTOM_IDS, MODELS_FILES, OPTIONS, PROMPTS
from test_images import encode, freezing_png, noise, png_claiming, with_chunk

from bot.images import ImageRejected, read_parameters
from bot.models import ModelsFileError, load_catalog
from bot.uploads import prepare_upload

SLOWEST_UPLOAD = 15.0  # seconds, off the event loop; generous for a shared two-core CI


def job_count(bot) -> int:
    with sqlite3.connect(bot.service.settings.database_path) as raw:
        return raw.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


async def ask(bot, member, options: dict, expected: str) -> None:
    """One /imagine; "queued" or a refusal containing `expected`, privately, nothing stored."""
    before = job_count(bot)
    answer = await (await bot.imagine(member, **options)).wait_response(timeout=10)
    quiet = answer.data.get("allowed_mentions")
    assert quiet is not None and quiet["parse"] == [], (options, quiet)
    if expected == "queued":
        assert "Queued as job #" in answer.content, (options, answer.content)
        return
    assert answer.ephemeral and expected in answer.content, (options, answer.content)
    assert "job #" not in answer.content
    assert job_count(bot) == before, options


async def test_hostile_prompts_and_options_end_in_a_refusal_or_a_job(
    discord_world, settings, held_runner
):
    w = discord_world
    held_runner.hold()  # queued jobs wait: the corpus is about admission
    relaxed = with_changes(settings, max_queued_per_member=0, max_request_cost=0)
    async with running_bot(w.fake, relaxed, runner=held_runner) as bot:
        for term in BLOCKED_TERMS:
            added = await w.fake.slash_command(
                w.mod, w.channel, "mod", {"term": term}, subcommands=("blocklist", "add")
            )
            await added.wait_response()
        for prompt, expected in PROMPTS:
            await ask(bot, w.alice, {"prompt": prompt, "seed": 1}, expected)
        for options, expected in OPTIONS:
            await ask(bot, w.alice, {"prompt": "a pond", **options}, expected)
        held_runner.release()
        await bot.wait_idle()
    assert not w.fake.problems()


async def test_forged_custom_ids_get_a_private_answer_and_touch_nothing(
    discord_world, imagine_bot, caplog
):
    w = discord_world
    inter = await imagine_bot.imagine(w.bob, prompt="a pond", seed=1)
    await inter.wait_response()
    result = await inter.wait_followup(timeout=30)
    before = job_count(imagine_bot)
    for custom_id in CUSTOM_IDS:
        for planted in (False, True):
            message = result
            if planted:
                message = w.fake.plant_bot_message(w.channel, "old buttons", [custom_id])
            press = await w.fake.click_button(w.alice, message, custom_id, forged=not planted)
            answer = await press.wait_original()
            assert answer.ephemeral, (custom_id, planted, answer.content)
            assert "Queued" not in answer.content, (custom_id, answer.content)
    assert job_count(imagine_bot) == before
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


def hostile_uploads() -> dict[str, bytes]:
    png = encode(noise(64, 64), "PNG")
    bomb_text = zlib.compress(b"parameters\x00" + b"a" * 2_000_000)
    return {
        "freezing parameters": freezing_png(),
        "claims 100k x 100k": png_claiming(100_000, 100_000),
        "claims 0 x 0": png_claiming(0, 0),
        "inflating zTXt": with_chunk(png, b"IHDR", b"zTXt", b"parameters\x00\x00" + bomb_text),
        "truncated": png[: len(png) // 2],
        "not an image": b"GIF89a" + b"\x00" * 64,
        "empty": b"",
        "a plain picture": png,
    }


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", sorted(hostile_uploads()))
def test_hostile_uploads_end_in_a_refusal_or_an_image(settings, name):
    data = hostile_uploads()[name]
    catalog = load_catalog(settings.models_file, settings.model_id)
    began = time.perf_counter()
    parameters = read_parameters(data)
    assert parameters is None or isinstance(parameters, dict)
    try:
        prepared = prepare_upload(data, settings, catalog)
    except ImageRejected as refusal:
        assert str(refusal) and name != "a plain picture"
    else:
        assert prepared.width % 8 == 0 and prepared.png.startswith(b"\x89PNG")
    assert time.perf_counter() - began < SLOWEST_UPLOAD, name


@pytest.mark.parametrize(("text", "expected"), MODELS_FILES)
def test_hostile_models_files_load_or_name_the_mistake(tmp_path, text, expected):
    path = tmp_path / "models.toml"
    path.write_text(text)
    if expected == "ok":
        assert load_catalog(path, "tiny").default
        return
    with pytest.raises(ModelsFileError, match=expected):
        load_catalog(path, "tiny")
