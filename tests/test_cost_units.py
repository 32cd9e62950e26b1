"""Cost units: how a request's cost is shown, and the ledger's move from images to units."""

import sqlite3

from factories import Clock, make_request

from bot.db import Store, admission, jobs, quotas
from bot.db.schema import MIGRATIONS
from bot.intake import AdmissionCaps, Intake
from bot.quota import cost_text, units_phrase, units_text

GUILD = 77
NOW = 1_000_000.0


def test_units_are_shown_with_at_most_three_decimals():
    assert [units_text(u) for u in (32, 12.5, 0.125, 0.1 + 0.2, 100_000)] == [
        "32",
        "12.5",
        "0.125",
        "0.3",
        "100000",
    ]
    assert (units_phrase(1), units_phrase(1.0), units_phrase(0.5)) == (
        "1 unit",
        "1 unit",
        "0.5 units",
    )


def test_cost_text_shows_how_a_cost_is_made_up():
    large = make_request(count=4, width=1024, height=1024, steps=50)
    assert cost_text(large) == "4 images × 1024×1024 × 50 steps = 32 units"
    assert cost_text(make_request(steps=25)) == "1 image × 512×512 × 25 steps = 1 unit"
    # From an init image only the steps really denoised count.
    image = make_request(steps=50, strength=0.6, mode="image")
    assert cost_text(image) == "1 image × 512×512 × 30 of 50 steps = 1.2 units"


def a_version_5_database(path):
    """A file as the bot left it before quotas counted units, with charges and a refund."""
    with sqlite3.connect(path) as raw:
        for script in MIGRATIONS[:5]:
            raw.executescript(script)
        raw.execute("PRAGMA user_version = 5")
        for job_id, member, count in ((1, 1, 3), (2, 1, 2), (3, 2, 1)):
            raw.execute(
                """INSERT INTO jobs (id, member_id, guild_id, prompt, seed, count, steps,
                       guidance, width, height, scheduler, model, status, queued_at)
                   VALUES (?, ?, ?, 'p', 1, ?, 25, 7.5, 512, 512, 'Euler', 'm', ?, ?)""",
                (job_id, member, GUILD, count, "failed" if job_id == 2 else "queued", NOW),
            )
        raw.executemany(
            """INSERT INTO ledger (guild_id, member_id, job_id, kind, images, window_at,
                   recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)""",
            [
                (GUILD, 1, 1, "charge", 3, NOW, NOW),
                (GUILD, 1, 2, "charge", 2, NOW, NOW),
                (GUILD, 1, 2, "refund", -2, NOW, NOW),
                (GUILD, 2, 3, "charge", 1, NOW, NOW),
            ],
        )
        raw.execute(
            "INSERT INTO member_quotas (guild_id, member_id, daily_limit) VALUES (?, 1, 10)",
            (GUILD,),
        )
        raw.execute(
            "INSERT INTO guild_settings (guild_id, name, value) VALUES (?, 'daily_limit', '4')",
            (GUILD,),
        )


async def test_the_upgrade_keeps_every_members_standing_and_refunds_once(tmp_path):
    path = tmp_path / "bot.sqlite3"
    a_version_5_database(path)
    store = await Store.open(path, clock=Clock(NOW + 60))
    assert await store.schema_version() == len(MIGRATIONS) >= 6
    # n images charged before are n units now, against the same limits.
    alice = await store.read(quotas.status, GUILD, 1, default_limit=0)
    bob = await store.read(quotas.status, GUILD, 2, default_limit=0)
    assert (alice.used, alice.limit, alice.left) == (3, 10, 7)
    assert (bob.used, bob.limit, bob.left) == (1, 4, 3)
    with sqlite3.connect(path) as raw:
        rows = raw.execute("SELECT job_id, kind, milliunits FROM ledger ORDER BY id").fetchall()
        indexes = {row[1] for row in raw.execute("PRAGMA index_list(jobs)")}
    assert rows == [
        (1, "charge", 3000),
        (2, "charge", 2000),
        (2, "refund", -2000),
        (3, "charge", 1000),
    ]
    assert "jobs_by_member_status" in indexes

    # An old job's refund is still given once, and in units: the failure repeats, the refund not.
    await store.write(jobs.mark_failed, 3, "RuntimeError: boom")
    await store.write(jobs.mark_failed, 3, "RuntimeError: boom again")
    await store.write(jobs.mark_failed, 2, "RuntimeError: boom")  # refunded before the upgrade
    assert (await store.read(quotas.status, GUILD, 2, default_limit=0)).used == 0
    assert (await store.read(quotas.status, GUILD, 1, default_limit=0)).used == 3

    # New charges are costs: 2 images of 512×512 at 50 steps are 4 units.
    job = await store.write(
        admission.admit,
        make_request(count=2, steps=50),
        Intake(1, GUILD, 3),
        AdmissionCaps(max_queued=3),
    )
    assert job.request.cost == 4
    alice = await store.read(quotas.status, GUILD, 1, default_limit=0)
    assert (alice.used, alice.left) == (7, 3)
    await store.close()
    with sqlite3.connect(path) as raw:
        net = raw.execute("SELECT job_id, SUM(milliunits) FROM ledger GROUP BY job_id").fetchall()
    assert net == [(1, 3000), (2, 0), (3, 0), (job.id, 4000)]
