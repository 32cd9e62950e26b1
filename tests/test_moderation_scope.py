"""One bot serves many servers, and a moderator is trusted within their own only: every /mod
view shows that server's members, jobs and units, never another server's."""

from dataclasses import replace

import pytest
from factories import make_job, make_request
from fakediscord import FakeMember
from harness.in_process import running_bot

from bot.queue import QueueIndex

# 128×128 at 20 steps: 0.05 units an image; three images make alice's figure easy to spot.
SMALL = {"prompt": "a fox", "width": 128, "height": 128, "steps": 20}


def test_shares_of_one_server_hold_only_its_members_jobs_and_units():
    index = QueueIndex()
    unit = make_request(steps=25)  # 1 unit
    for job_id, member, guild, weight in [(1, 1, 1, 1.0), (2, 1, 2, 3.0), (3, 2, 1, 1.0)]:
        job = make_job(job_id, replace(unit, count=job_id))
        index.add(replace(job, member_id=member, guild_id=guild, weight=weight))
    here = index.shares(guild_id=2)
    assert [(s.member_id, s.jobs, s.units, s.weight) for s in here] == [(1, 1, 2.0, 3.0)]
    assert here[0].share == pytest.approx(3 / 4)  # of the whole device: weights 3 and 1
    assert index.shares(guild_id=3) == []
    everyone = index.shares()
    assert [(s.member_id, s.jobs, s.units) for s in everyone] == [(1, 2, 3.0), (2, 1, 3.0)]


def mentions_of(*members):
    return [str(member.id) for member in members]


async def test_a_moderator_of_server_b_sees_nobody_of_server_a(
    discord_world, settings, held_runner
):
    w = discord_world
    b = w.fake.add_guild("Server B")
    b_mod = w.fake.add_member(b, "bmod", moderator=True)
    carol = w.fake.add_member(b, "carol")
    alice_in_b = FakeMember(w.alice.user, b.id, [])  # alice is a member of both servers
    b.members[w.alice.id] = alice_in_b

    async def mod_b(*subcommands, **options):
        asked = await w.fake.slash_command(
            b_mod, b.channel, "mod", options, subcommands=subcommands
        )
        return (await asked.wait_response()).content

    async with running_bot(w.fake, settings, runner=held_runner) as bot:
        held_runner.hold()
        try:
            await bot.queued_job(await bot.imagine(w.bob, seed=1, **SMALL))  # runs, held
            await held_runner.wait_calls(1)
            for seed in (2, 3):
                await bot.queued_job(await bot.imagine(w.alice, seed=seed, count=3, **SMALL))
            await bot.queued_job(await bot.imagine(carol, b.channel, seed=4, **SMALL))

            listed = await mod_b("queue", "list")
            assert carol.mention in listed and "Fair share" in listed
            assert not [id_ for id_ in mentions_of(w.alice, w.bob) if id_ in listed]
            assert "running" not in listed  # bob's job runs in server A
            assert "0.3 units" not in listed  # alice's two jobs of 0.15 units
            assert len([line for line in listed.splitlines() if "units queued" in line]) == 1

            shown = await mod_b("quota", "show", member=alice_in_b)
            assert "0 job(s) queued or running here" in shown

            stats = await mod_b("stats")
            assert not [id_ for id_ in mentions_of(w.alice, w.bob) if id_ in stats]

            set_in_a = await w.fake.slash_command(
                w.mod,
                w.channel,
                "mod",
                {"member": w.alice, "limit": 9},
                subcommands=("quota", "set"),
            )
            await set_in_a.wait_response()
            assert await mod_b("audit") == "No moderator actions yet."

            # Server A's moderator sees their own members, and not carol.
            theirs = await w.fake.slash_command(
                w.mod, w.channel, "mod", {}, subcommands=("queue", "list")
            )
            theirs = (await theirs.wait_response()).content
            assert w.alice.mention in theirs and w.bob.mention in theirs
            assert str(carol.id) not in theirs
        finally:
            held_runner.release()
        await bot.wait_idle()

        stats = await mod_b("stats")
        assert carol.mention in stats  # this week's top members: carol's one image
        assert not [id_ for id_ in mentions_of(w.alice, w.bob) if id_ in stats]
