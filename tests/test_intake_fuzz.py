"""Hostile files through the intake: thousands of mutated images end in a clean refusal or an
image, each within a time bound (bench/fuzz_intake.py runs 100,000), and a PNG built to freeze
the parser, sent through the Vary paths, does not delay another member's /imagine."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import time

import pytest
from test_images import freezing_png

from bench.fuzz_intake import fuzz

SLOWEST_INPUT = 1.0  # seconds; the intake takes milliseconds on these small files


@pytest.mark.filterwarnings("ignore")  # Pillow warns about most damaged files
def test_mutated_images_end_in_a_refusal_or_an_image() -> None:
    report = fuzz(3000, seed=13, stop_after=SLOWEST_INPUT)
    failures = [f"{seed}: {error}" for seed, error, _ in report.failures]
    assert not failures, "\n".join(report.lines() + failures[:10])
    assert report.count == 3000 and report.slowest < SLOWEST_INPUT
    assert report.outcomes["rejected"] > 100 and report.outcomes["accepted"] > 100
    assert report.outcomes["accepted with parameters"] > 10


def test_the_prompt_language_ends_in_a_refusal_or_checked_jobs() -> None:
    report = fuzz(3000, seed=17, target="prompts", stop_after=SLOWEST_INPUT)
    failures = [f"{seed}: {error}" for seed, error, _ in report.failures]
    assert not failures, "\n".join(report.lines() + failures[:10])
    accepted = sum(n for outcome, n in report.outcomes.items() if outcome.startswith("accepted"))
    assert report.outcomes["refused"] > 100 and accepted > 100, report.lines()


@pytest.mark.filterwarnings("ignore")
def test_operations_on_mutated_results_end_in_a_refusal_or_a_start_picture() -> None:
    """Upscale, Zoom Out and Pan of damaged files at random parent sizes; the big decodes make
    the bound looser than for uploads."""
    report = fuzz(300, seed=19, target="operations", stop_after=3 * SLOWEST_INPUT)
    failures = [f"{seed}: {error}" for seed, error, _ in report.failures]
    assert not failures, "\n".join(report.lines() + failures[:10])
    assert set(report.outcomes) == {"accepted", "rejected", "refused: too large"}, report.lines()


async def first_words(inter, timeout: float = 10.0) -> str:
    """What the member first reads: the response, or the follow-up after a "thinking…" defer."""
    response = await inter.wait_response(timeout)
    if response.content is None:
        return (await inter.wait_followup(timeout=timeout)).content
    return response.content


@pytest.fixture
def frozen_loop_ends_the_run(request):
    """A regex running in C holds the GIL: no signal handler or Python thread (pytest-timeout's
    included) can stop it. faulthandler's watchdog is C: past a minute it prints every stack to
    the terminal, naming the frozen parser, and ends the run, instead of an hour's hang."""
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        terminal = os.dup(2)  # stderr as it is outside pytest's capture
    faulthandler.dump_traceback_later(60, exit=True, file=terminal)
    yield
    faulthandler.cancel_dump_traceback_later()
    os.close(terminal)


@pytest.mark.parametrize("path", ["context menu", "reply"])
async def test_a_freezing_png_in_flight_does_not_delay_another_members_imagine(
    discord_world, imagine_bot, frozen_loop_ends_the_run, path
):
    w = discord_world
    theirs = await w.fake.send_message(
        w.bob, w.channel, "", attachments=[("frozen.png", freezing_png())]
    )

    def downloaded() -> bool | None:
        return any("/frozen.png" in r.path for r in w.fake.requests) or None

    if path == "context menu":
        hostile = await w.fake.message_command(w.bob, w.channel, "Vary", theirs)
    else:
        hostile = await w.fake.send_message(
            w.bob, w.channel, "..", reply_to=theirs, mentions_bot=True
        )
    await w.fake.wait_until(downloaded)  # the bot is reading the file
    sent_at = time.monotonic() + 0.5  # when alice sends her /imagine; a frozen loop delays it
    await asyncio.sleep(0.5)
    inter = await imagine_bot.imagine(w.alice, prompt="a lighthouse", seed=1)
    answer = await first_words(inter, timeout=30)
    waited = time.monotonic() - sent_at
    assert waited < 3, f"alice's /imagine was answered {waited:.1f} s after she sent it"
    assert "job #" in answer
    # bob's megabyte of text is not read: he is told what is missing, and nothing is queued
    if path == "context menu":
        told = await first_words(hostile)
    else:
        told = (await w.fake.wait_for_message(lambda m: m.reference == hostile.id)).content
    assert told and "job #" not in told
