"""The Prometheus endpoint (METRICS_PORT), scraped over HTTP while the real bot runs against
the fake Discord, and `/mod stats`, which shows the same counters."""

from __future__ import annotations

import socket
from dataclasses import replace

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.db import moderation
from bot.metrics import reason_of
from bot.quota import PromptBlocked


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def settings(settings):
    """The suite's settings with the endpoint on."""
    return replace(settings, metrics_port=free_port())


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the endpoint serves: (name, sorted labels) -> value."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/metrics") as response,
    ):
        assert response.status == 200
        text = await response.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_the_endpoint_serves_the_counters_and_mod_stats_shows_them(
    discord_world, imagine_bot, held_runner, settings
):
    w, port = discord_world, settings.metrics_port
    held_runner.hold()
    running = await imagine_bot.queued_job(await imagine_bot.imagine(w.alice, prompt="a", seed=1))
    await held_runner.wait_calls(1)
    waiting = [
        await imagine_bot.queued_job(await imagine_bot.imagine(who, prompt="b", seed=2, width=128))
        for who in (w.alice, w.bob)
    ]
    await imagine_bot.store.write(moderation.add_blocked_term, w.guild.id, "forbidden", w.mod.id)
    refused = await imagine_bot.imagine(w.bob, prompt="a forbidden thing", seed=3)
    await refused.wait_response()

    live = await scrape(port)
    key = waiting[0].job.request.batch_key
    labels = (
        ("mode", key.mode),
        ("model", key.model),
        ("scheduler", key.scheduler),
        ("size", "128x64"),
        ("steps", str(key.steps)),
    )
    assert live[("imagine_queue_jobs", labels)] == 2  # the running job left the queue
    assert live[("imagine_worker_resident_model", (("model", "tiny"), ("worker", "local")))] == 1
    reason = (("reason", reason_of(PromptBlocked("forbidden"))),)
    assert live[("imagine_refusals_total", reason)] == 1

    held_runner.release()
    await imagine_bot.wait_idle()
    after = await scrape(port)
    worker = (("worker", "local"),)
    assert after[("imagine_images_total", worker)] == 3
    assert after[("imagine_calls_total", worker)] == 2  # the two 128×64 jobs share a call
    assert after[("imagine_batch_fill_count", ())] == 2
    assert after[("imagine_batch_fill_sum", ())] == pytest.approx(1 / 4 + 2 / 4)  # cap 4
    assert after[("imagine_wait_seconds_count", ())] == 3
    assert after[("imagine_generation_seconds_count", ())] == 2
    assert 0 < after[("imagine_worker_busy_share", worker)] <= 1
    assert not any(name == "imagine_queue_jobs" for name, _ in after)  # nothing queued
    assert running.job.id < waiting[0].job.id

    stats = await (
        await w.fake.slash_command(w.mod, w.channel, "mod", {}, subcommands=("stats",))
    ).wait_response()
    assert "Since the bot started: 3 images in 2 calls, batches 38% full on average" in (
        stats.content
    )
    # The session's runner is shared: other tests may have loaded more models beside tiny.
    assert "Loaded: local: tiny" in stats.content and "prompt_blocked 1" in stats.content
