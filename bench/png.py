"""PNG encoding of results: zlib level 1 (the bot's) against Pillow's default 6.

Encoding is what the bot process itself spends most CPU on per image (the cog encodes each
image, and a grid for several, before the upload). The picture is made here to look like a
diffusion result to zlib: smooth shapes and gradients with a fine grain, no real photograph
being at hand offline; pure noise (what the random tiny model draws) is also timed, where zlib
finds nothing to compress at any level. Prints milliseconds and KiB per level and the ratios.

    .venv/bin/python -m bench.png --repeats 9
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from bench.report import table, write_json
from bot.images import PNG_COMPRESS_LEVEL, grid

PILLOW_DEFAULT = 6


def picture(side: int, rng: np.random.Generator) -> Image.Image:
    """Smooth shapes (a Mandelbrot set), a colour gradient and a little grain, lightly blurred."""
    shapes = np.asarray(Image.effect_mandelbrot((side, side), (-2, -1.5, 1, 1.5), 64), float)
    across, down = np.meshgrid(np.linspace(0, 255, side), np.linspace(255, 0, side))
    rgb = np.stack([shapes * 0.5 + across * 0.5, shapes * 0.3 + down * 0.7, across * 0.6], -1)
    rgb += rng.normal(0, 6, rgb.shape)
    image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    return image.filter(ImageFilter.GaussianBlur(0.6))


def noise(side: int, rng: np.random.Generator) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))


def encode(image: Image.Image, level: int, repeats: int) -> tuple[float, int]:
    """Median milliseconds of one encode, and the bytes written."""
    times, size = [], 0
    for _ in range(repeats + 1):  # the first is a warm-up
        buffer = io.BytesIO()
        started = time.perf_counter()
        image.save(buffer, format="PNG", compress_level=level)
        times.append(time.perf_counter() - started)
        size = len(buffer.getvalue())
    return statistics.median(times[1:]) * 1000, size


def measure(repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    cases = {
        "picture 512²": picture(512, rng),
        "picture 1024²": picture(1024, rng),
        "grid of four 512² pictures": grid([picture(512, rng) for _ in range(4)]),
        "noise 256²": noise(256, rng),
    }
    results: dict[str, Any] = {}
    rows = []
    for name, image in cases.items():
        ours_ms, ours_bytes = encode(image, PNG_COMPRESS_LEVEL, repeats)
        default_ms, default_bytes = encode(image, PILLOW_DEFAULT, repeats)
        results[name] = {
            "level_ours": PNG_COMPRESS_LEVEL,
            "ms": {"ours": ours_ms, "default": default_ms},
            "bytes": {"ours": ours_bytes, "default": default_bytes},
        }
        rows.append(
            [
                name,
                f"{default_ms:.1f}",
                f"{ours_ms:.1f}",
                f"{default_ms / ours_ms:.2f}x",
                f"{default_bytes / 1024:.0f}",
                f"{ours_bytes / 1024:.0f}",
                f"{ours_bytes / default_bytes - 1:+.0%}",
            ]
        )
    print(f"PNG encode, median of {repeats}; level {PILLOW_DEFAULT} (Pillow) against "
          f"{PNG_COMPRESS_LEVEL} (the bot)")  # fmt: skip
    level = PNG_COMPRESS_LEVEL
    headers = ["image", "ms, 6", f"ms, {level}", "faster", "KiB, 6", f"KiB, {level}", "larger"]
    print(table(headers, rows))
    return {"repeats": repeats, "cases": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="encodes timed per case")
    parser.add_argument("--out", type=Path, default=Path("bench/results/png.json"))
    args = parser.parse_args()
    write_json(args.out, measure(args.repeats))


if __name__ == "__main__":
    main()
