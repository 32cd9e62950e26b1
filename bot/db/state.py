"""Name/value pairs the bot keeps about itself (the hash of the command tree it last
registered with Discord), in the `app_state` table."""

from __future__ import annotations

from bot.db.connection import Tx


async def get(tx: Tx, name: str) -> str | None:
    return await tx.value("SELECT value FROM app_state WHERE name = ?", (name,))


async def put(tx: Tx, name: str, value: str) -> None:
    await tx.run(
        """INSERT INTO app_state (name, value) VALUES (?, ?)
           ON CONFLICT (name) DO UPDATE SET value = excluded.value""",
        (name, value),
    )
