"""Measured seconds per denoising step, kept across restarts so ETAs are right from the start."""

from __future__ import annotations

from bot.db.connection import Tx
from bot.eta import SpeedKey, blend


async def record(tx: Tx, key: SpeedKey, seconds_per_step: float) -> None:
    """Blend a measurement into the stored moving average."""
    previous = await tx.value(
        "SELECT seconds_per_step FROM speeds WHERE model = ? AND pixels = ? AND images = ?",
        (key.model, key.pixels, key.images),
    )
    await tx.run(
        """INSERT INTO speeds (model, pixels, images, seconds_per_step) VALUES (?, ?, ?, ?)
           ON CONFLICT (model, pixels, images)
           DO UPDATE SET seconds_per_step = excluded.seconds_per_step""",
        (key.model, key.pixels, key.images, blend(previous, seconds_per_step)),
    )


async def measured(tx: Tx) -> dict[SpeedKey, float]:
    rows = await tx.all("SELECT model, pixels, images, seconds_per_step FROM speeds")
    return {SpeedKey(r["model"], r["pixels"], r["images"]): r["seconds_per_step"] for r in rows}
