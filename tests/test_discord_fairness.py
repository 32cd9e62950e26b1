"""Fair share as members meet it through Discord: one member's flood does not hold up another
member's job, and moderators see each member's share in /mod queue list, a page at a time."""

from dataclasses import replace

import pytest

from bot.db import jobs

# Six sizes: none of the flood's jobs batch with each other or with bob's.
FLOOD_WIDTHS = (64, 72, 80, 88, 96, 104)


@pytest.fixture
def settings(settings, discord_world):
    """Room for a flood, and the moderator role weighing three members."""
    moderator_role = discord_world.mod.role_ids[0]
    return replace(settings, max_queued_per_member=10, role_weights={moderator_role: 3.0})


async def mod(world, *subcommands, **options):
    return await world.fake.slash_command(
        world.mod, world.channel, "mod", options, subcommands=subcommands
    )


async def test_a_second_members_job_is_delivered_while_the_flood_is_still_queued(
    discord_world, imagine_bot
):
    w, runner = discord_world, imagine_bot.runner
    runner.hold()
    flood = [
        await imagine_bot.imagine(w.alice, prompt=f"flood {i}", seed=i, width=width, steps=8)
        for i, width in enumerate(FLOOD_WIDTHS)
    ]
    await runner.wait_calls(1)
    for inter in flood:
        await inter.wait_response(3)
    bob = await imagine_bot.imagine(w.bob, prompt="just one", seed=99, width=112)
    queued = await bob.wait_response(3)
    assert "next in line" in queued.content

    listing = (await (await mod(w, "queue", "list")).wait_response()).content
    assert "running #" in listing and f"1. #{(await imagine_bot.queued_job(bob)).job.id}" in listing
    assert f"{w.alice.mention} 50%" in listing and f"{w.bob.mention} 50%" in listing
    assert "5 job(s)" in listing  # alice's queued flood, one running

    runner.release()
    delivered = await bob.wait_followup(1)
    assert "just one" in delivered.content or delivered.attachments
    alice_waiting = [
        record
        for record in [await imagine_bot.queued_job(inter) for inter in flood]
        if record.job.status == "queued"
    ]
    assert len(alice_waiting) >= 3, "bob's job ran only after most of the flood"
    assert [specs[0].prompt for _key, specs in runner.calls[:2]] == ["flood 0", "just one"]
    await imagine_bot.wait_idle()


async def test_the_queue_list_pages_through_a_long_queue(discord_world, imagine_bot):
    w, runner = discord_world, imagine_bot.runner
    runner.hold()
    members = (w.alice, w.bob, w.mod)
    for i in range(20):  # twenty sizes: no two jobs share a call
        member = members[i % 3]
        inter = await imagine_bot.imagine(member, prompt=f"job {i}", seed=i, width=64 + 8 * i)
        await inter.wait_response(3)
    await runner.wait_calls(1)
    first = (await (await mod(w, "queue", "list")).wait_response()).content
    second = (await (await mod(w, "queue", "list", page=2)).wait_response()).content
    empty = (await (await mod(w, "queue", "list", page=3)).wait_response()).content
    assert "running #" in first and "running #" not in second
    assert "1. #" in first and "15. #" in first and "16. #" not in first
    assert "16. #" in second and "19. #" in second and "19 job(s) queued" in second
    assert "Page 3 of the queue is empty." in empty
    runner.release()
    await imagine_bot.wait_idle()


async def test_a_weighted_role_gets_its_share_of_the_gpu(discord_world, imagine_bot):
    w, runner = discord_world, imagine_bot.runner
    runner.hold()
    await (await imagine_bot.imagine(w.bob, prompt="running", seed=0, width=256)).wait_response(3)
    await runner.wait_calls(1)
    for i, member in enumerate((w.alice, w.alice, w.mod, w.mod)):
        inter = await imagine_bot.imagine(member, prompt=f"job {i}", seed=i, width=64 + 8 * i)
        await inter.wait_response(3)
    listing = (await (await mod(w, "queue", "list")).wait_response()).content
    assert f"{w.mod.mention} 75% (weight 3)" in listing
    assert f"{w.alice.mention} 25% (weight 1)" in listing
    # The moderator's second job comes before alice's second: their turns come 3× as often.
    order = [line.split()[1] for line in listing.splitlines() if line[:1].isdigit()]
    records = {
        r.job.request.prompt: f"#{r.job.id}"
        for r in [await imagine_bot.store.read(jobs.get, i) for i in range(2, 6)]
    }
    assert order.index(records["job 3"]) < order.index(records["job 1"])
    runner.release()
    await imagine_bot.wait_idle()
