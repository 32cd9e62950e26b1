"""Hostile option values sent as real INTERACTION_CREATE payloads: each is a clear refusal or
a valid job; no traceback reaches a member; nothing refused is stored or charged."""

import asyncio
import math
import sqlite3
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.db import jobs
from bot.requests import MAX_SEED, SCHEDULERS

NASTY_TEXT = [
    "",
    " ",
    "x" * 10_000,
    "\x00\x01\x02",
    "\u202ereversed\u202c",
    "\u200f\u200e",
    "'; DROP TABLE jobs; --",
    "Robert'); DELETE FROM ledger WHERE (1=1",
    "%s %d {0} {prompt}",
    "<@everyone> @here",
    "a panda\nNegative prompt: evil",
]
text = st.one_of(st.sampled_from(NASTY_TEXT), st.text(max_size=40))
numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-5, max_value=2000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
)
anything = st.one_of(text, numbers)
sides = st.sampled_from([64, 128, 192, 256])
options = st.fixed_dictionaries(
    {"prompt": st.one_of(text, numbers, st.just("a panda surfing"))},
    optional={
        # Each option is often valid, so refusals come one problem at a time as well.
        "seed": st.one_of(anything, st.integers(0, 1000)),
        "negative_prompt": anything,
        "steps": st.one_of(anything, st.integers(1, 20)),
        "guidance": st.one_of(anything, st.floats(0, 30)),
        "width": st.one_of(anything, sides),
        "height": st.one_of(anything, sides),
        "scheduler": st.one_of(st.sampled_from(SCHEDULERS), text),
        "count": st.one_of(anything, st.integers(1, 4)),
        # No models.toml: the one model is `tiny`, and it takes no LoRAs.
        "model": st.one_of(anything, st.just("tiny")),
        "lora": st.one_of(anything, st.just("")),
    },
)

LEAKS = ("Traceback", "Something went wrong", "Error:", "Exception", "sqlite")


def counts(path):
    with sqlite3.connect(path) as raw:
        return raw.execute(
            "SELECT (SELECT COUNT(*) FROM jobs), (SELECT COUNT(*) FROM ledger)"
        ).fetchone()


def valid_job(request, limits):
    return (
        request.prompt.strip()
        and 0 <= request.seed <= MAX_SEED
        and 1 <= request.steps <= limits.max_steps
        and math.isfinite(request.guidance)
        and limits.min_side <= request.width <= limits.max_side
        and request.width % 8 == 0
        and request.height % 8 == 0
        and 1 <= request.count <= limits.max_count
        and request.scheduler in SCHEDULERS
        and (request.model, request.loras) == ("tiny", ())
    )


@pytest.fixture(name="settings")
def any_number_queued(settings):
    """One member (alice) queues every valid example behind a held call: no per-member limit."""
    return replace(settings, max_queued_per_member=0)


async def test_hostile_option_values(discord_world, imagine_bot, held_runner):
    held_runner.hold()  # admitted jobs wait in the queue; only admission is under test
    w = discord_world
    path = imagine_bot.service.settings.database_path
    limits = imagine_bot.service.settings.limits
    seen = {"refused": 0, "queued": 0}

    async def check(values):
        before = counts(path)
        inter = await w.fake.slash_command(w.alice, w.channel, "imagine", values)
        response = await inter.wait_response(5)
        assert not any(leak in response.content for leak in LEAKS), response.content
        if response.ephemeral:
            assert "`" in response.content and "Nothing was queued" in response.content
            assert counts(path) == before
            seen["refused"] += 1
        else:
            assert response.content.startswith("Queued as job #"), response.content
            record = await imagine_bot.queued_job(inter)
            assert valid_job(record.job.request, limits), record.job.request
            assert counts(path) == (before[0] + 1, before[1] + 1)
            seen["queued"] += 1

    # Hypothesis drives from a worker thread; each example runs on the bot's event loop.
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=2000,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(options)
    def one(values):
        asyncio.run_coroutine_threadsafe(check(values), loop).result(30)

    await asyncio.to_thread(one)
    # Hypothesis seeds its choices with constants it finds in our source, so the split moves
    # whenever the code does (64 and 48 queued, before and after issue 13): only both matter.
    assert seen["refused"] > 100 and seen["queued"] > 20, seen
    print(f"hostile options: {seen}")
    await imagine_bot.store.write(jobs.cancel_queued, w.guild.id)


# ---- flags in replies (issues 13, 16): bounded before parsing, echoed without pinging -------

HOSTILE_INLINE = {
    "--seed @everyone": "@everyone",
    "--steps @here": "@here",
    "--seed " + "9" * 4000: "at most 1500",
    "--seed " + "9" * 400: "at most 24",
    "--" + "a" * 1400: "is not a flag I know",
    "--guidance " + "1" * 400 + ".5": "at most 24",
}


async def test_hostile_reply_options_are_refused_briefly_and_ping_nobody(
    discord_world, imagine_bot
):
    w = discord_world
    inter = await imagine_bot.imagine(w.mod, prompt="a tower", seed=1)
    await inter.wait_response()
    result = await inter.wait_followup(timeout=30)
    for text, expected in HOSTILE_INLINE.items():
        mine = await w.fake.send_message(w.alice, w.channel, f"a tower {text}", reply_to=result)
        answer = await w.fake.wait_for_message(lambda m, i=mine.id: m.reference == i)
        assert expected in answer.content and "Nothing was queued" in answer.content
        assert len(answer.content) < 300, len(answer.content)
        assert not answer.mention_everyone and answer.mention_ids == [], answer.content
    assert w.fake.problems() == []
    assert await imagine_bot.store.read(jobs.count) == 1
