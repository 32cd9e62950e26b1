"""A start picture prepared for the model: a member's upload checked, decoded and sized off the
event loop, or a picture a job makes (Upscale, Zoom Out, Pan, a Reroll's stored one)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bot.images import decode_upload, fit_for_model, png_bytes
from bot.models import Catalog
from bot.settings import Settings

# Uploads are decoded here, two at a time: a flood of them queues up instead of taking every
# thread of the default pool (which the database connection and Discord's client share too).
DECODE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode-upload")


@dataclass(frozen=True)
class PreparedImage:
    """A start picture as PNG bytes and their hash. A member's upload (`upload_size`, its size
    as uploaded) is kept at the largest model's area and drawn at each model's own
    (`fitted_size`); a picture made for a job (Upscale, Zoom Out, Pan, a Reroll) is drawn at
    its own size."""

    png: bytes
    hash: str
    width: int
    height: int
    upload_size: tuple[int, int] | None = None

    @property
    def shape(self) -> tuple[str, int, int]:
        """What validation needs of it: (hash, width, height)."""
        return self.hash, self.width, self.height


def prepare_upload(data: bytes, settings: Settings, catalog: Catalog) -> PreparedImage:
    """Check and decode a member's upload (raises ImageRejected), resized for the model with
    the largest default area: whichever model draws it, the runner then only shrinks it."""
    image = decode_upload(
        data, max_bytes=settings.max_upload_bytes, max_pixels=settings.max_upload_pixels
    )
    largest = max(
        (catalog.limits_for(m.name, settings.limits) for m in catalog.usable_models()),
        key=lambda limits: limits.default_width * limits.default_height,
        default=settings.limits,
    )
    fitted = fit_for_model(image, largest)
    png = png_bytes(fitted)
    return PreparedImage(png, hashlib.sha256(png).hexdigest(), *fitted.size, image.size)
