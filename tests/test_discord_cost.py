"""Cost units and per-member limits as a member meets them through Discord: /quota and the dry
run speak in units, a request over the cost cap and one past the per-member queue limit are
refused privately (on /imagine and on a button) and nothing is queued or charged."""

import sqlite3
from dataclasses import replace

import pytest
from harness.answers import job_id_of

# The tests' tiny model keeps requests under a unit: a 128×128 image at 20 steps is 0.05.
FOX = {"prompt": "a fox", "width": 128, "height": 128, "steps": 20}
EXPENSIVE = {"prompt": "a crowd", "width": 256, "height": 256, "steps": 20, "count": 4}
EXPENSIVE_COST = "4 images × 256×256 × 20 steps = 0.8 units"


@pytest.fixture
def settings(settings):
    return replace(settings, daily_quota=1, max_queued_per_member=2, max_request_cost=0.5)


def spent(bot, member):
    """(jobs, net milliunits charged) of a member, read from the file."""
    with sqlite3.connect(bot.service.settings.database_path) as raw:
        return raw.execute(
            """SELECT (SELECT COUNT(*) FROM jobs WHERE member_id = ?),
                      (SELECT COALESCE(SUM(milliunits), 0) FROM ledger WHERE member_id = ?)""",
            (member.id, member.id),
        ).fetchone()


async def own_quota(w, member):
    answer = await (await w.fake.slash_command(member, w.channel, "quota")).wait_response()
    assert answer.ephemeral
    return answer.content


async def test_quota_and_the_dry_run_speak_in_units(discord_world, imagine_bot):
    w = discord_world
    before = await own_quota(w, w.alice)
    assert "used 0 of your 1 unit in the last 24 hours. 1 unit left." in before
    assert "at most 0.5 units" in before and "queued or running: 0 of at most 2" in before

    await imagine_bot.queued_job(await imagine_bot.imagine(w.alice, seed=1, count=2, **FOX))
    await imagine_bot.wait_idle()
    after = await own_quota(w, w.alice)
    assert "used 0.1 of your 1 unit in the last 24 hours. 0.9 units left." in after
    assert "<t:" in after  # when the charge leaves the window
    assert spent(imagine_bot, w.alice) == (1, 100)

    preview = await imagine_bot.imagine(w.alice, seed=2, preview=True, **FOX)
    panel = await preview.wait_original()
    assert panel.ephemeral
    assert "Cost: 1 image × 128×128 × 20 steps = 0.05 units" in panel.content
    assert "you have used 0.1 of your 1 unit in the last 24 hours" in panel.content
    assert "refuse" not in panel.content

    shown = await w.fake.slash_command(
        w.mod, w.channel, "mod", {"member": w.alice}, subcommands=("quota", "show")
    )
    assert (
        "0.1 units in the last 24 hours; limit: 1 unit a day"
        in (await shown.wait_response()).content
    )


async def test_a_request_over_the_cost_cap_is_refused_privately_on_imagine_and_confirm(
    discord_world, imagine_bot
):
    w = discord_world
    refused = await (await imagine_bot.imagine(w.alice, seed=1, **EXPENSIVE)).wait_original()
    assert refused.ephemeral
    assert f"This request is {EXPENSIVE_COST}; one request may cost at most 0.5 units" in (
        refused.content
    )
    assert "Nothing was queued or charged" in refused.content and "job #" not in refused.content

    preview = await imagine_bot.imagine(w.alice, seed=1, preview=True, **EXPENSIVE)
    panel = await preview.wait_original()
    assert f"Cost: {EXPENSIVE_COST}" in panel.content
    assert "One request may cost at most 0.5 units: Confirm will refuse it" in panel.content
    custom_id = panel.components[0]["components"][0]["custom_id"]
    confirmed = await (await w.fake.click_button(w.alice, panel, custom_id)).wait_original()
    assert confirmed.ephemeral and f"This request is {EXPENSIVE_COST}" in confirmed.content
    assert spent(imagine_bot, w.alice) == (0, 0)
    assert not w.fake.problems()


async def test_a_full_queue_is_refused_privately_on_imagine_and_reroll(
    discord_world, imagine_bot, held_runner
):
    w = discord_world
    first = await imagine_bot.imagine(w.alice, seed=1, **FOX)
    first_id = job_id_of((await first.wait_response()).content)
    result = await first.wait_followup(timeout=30)
    await imagine_bot.wait_idle()

    held_runner.hold()
    running = await imagine_bot.queued_job(await imagine_bot.imagine(w.alice, seed=2, **FOX))
    await held_runner.wait_calls(2)  # the first job's call, then this one, held
    waiting = await imagine_bot.imagine(w.alice, seed=3, **FOX)
    queued = await imagine_bot.queued_job(waiting)
    assert running.job.id != queued.job.id
    before = spent(imagine_bot, w.alice)
    full = "You have 2 jobs queued or running; the limit is 2: wait for one to finish or cancel one"

    refused = await (await imagine_bot.imagine(w.alice, seed=4, **FOX)).wait_original()
    assert refused.ephemeral and full in refused.content and "job #" not in refused.content
    reroll = await w.fake.click_button(w.alice, result, f"reroll:{first_id}")
    pressed = await reroll.wait_original()
    assert pressed.ephemeral and full in pressed.content
    assert spent(imagine_bot, w.alice) == before
    assert "queued or running: 2 of at most 2" in await own_quota(w, w.alice)

    # The limit is each member's own; and cancelling one of hers makes room again.
    await imagine_bot.queued_job(await imagine_bot.imagine(w.bob, seed=5, **FOX))
    status = await waiting.original()
    await (await w.fake.click_button(w.alice, status, f"cancel:{queued.job.id}")).wait_response()
    again = await imagine_bot.queued_job(await imagine_bot.imagine(w.alice, seed=6, **FOX))
    assert again.job.request.seed == 6
    held_runner.release()
    await imagine_bot.wait_idle()
    assert not w.fake.problems()
