"""The `fake_discord` fixture. Register with `pytest_plugins = ["fakediscord.pytest_plugin"]`.

Options for `FakeDiscord` come from the `fake_discord_options` fixture, which a test can
override by parametrizing it:

    @pytest.mark.parametrize("fake_discord_options", [{"heartbeat_interval_ms": 300}])
    async def test_heartbeats(fake_discord): ...

At teardown the test fails if the bot hit a route the fake does not know, sent something
Discord would refuse, or crashed the fake; a test that provokes a refusal on purpose clears
`fake.rejected` (or `fake.unknown_routes`) before it ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from .driver import FakeDiscord


@pytest.fixture
def fake_discord_options() -> dict[str, Any]:
    """Keyword arguments for `FakeDiscord`; parametrize this to change them."""
    return {}


@pytest_asyncio.fixture
async def fake_discord(fake_discord_options: dict[str, Any]) -> AsyncIterator[FakeDiscord]:
    async with FakeDiscord(**fake_discord_options) as fake:
        yield fake
    problems = fake.problems()
    if problems:
        pytest.fail("fake Discord saw problems:\n" + "\n".join(problems), pytrace=False)
