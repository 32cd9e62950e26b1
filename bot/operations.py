"""Upscale ×2, Zoom Out and Pan as geometry and pixels: the size each makes from its parent
(multiples of 8, within MAX_SIZE, or refused), the canvas the new job starts from, the box of
the parent's pixels it keeps, the masks that say what is painted anew, and the paste-back
that keeps the parent's pixels exactly where they were.

Pure Pillow and numpy (no torch): the cogs plan an operation with it, the runner paints with
its masks, and both are testable on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageFilter

from bot.images import decode_upload, png_bytes
from bot.models import Catalog
from bot.requests import GenerationRequest

Box = tuple[int, int, int, int]  # left, top, right (exclusive), bottom (exclusive)

UPSCALES = {"upscale-subtle": "Subtle", "upscale-creative": "Creative"}
ZOOMS = {"zoom-1.5": 1.5, "zoom-2": 2.0}
# Pan: which side of the parent the new strip is added on.
PANS = {"pan-left": "left", "pan-right": "right", "pan-up": "up", "pan-down": "down"}
OPERATIONS: tuple[str, ...] = (*UPSCALES, *ZOOMS, *PANS)
# The parent's pixels along a seam are blended over at most this many pixels, so the new area
# meets them without an edge; everything farther inside is the parent's, pixel for pixel.
FEATHER = 16
SIZE_STEP = 8


class OperationRefused(ValueError):
    """The operation would make an image larger than allowed; the message says so."""


@dataclass(frozen=True)
class OperationPlan:
    """What an operation makes of a `parent` size: the new size, and for Zoom Out and Pan
    (mode "inpaint") the box where the parent's pixels stay."""

    operation: str
    width: int
    height: int
    keep_box: Box | None = None

    @property
    def mode(self) -> str:
        return "image" if self.keep_box is None else "inpaint"


def _multiple_of_8(value: float) -> int:
    return max(SIZE_STEP, round(value / SIZE_STEP) * SIZE_STEP)


def plan(operation: str, width: int, height: int, *, max_side: int, pan_step: int) -> OperationPlan:
    """The size (and kept box) `operation` makes of a `width`×`height` parent. A result over
    `max_side` is refused rather than capped: "Zoom Out ×2" that zooms ×1.3 would mislead."""
    if operation in UPSCALES:
        new_width, new_height, box = width * 2, height * 2, None
    elif operation in ZOOMS:
        factor = ZOOMS[operation]
        new_width, new_height = _multiple_of_8(width * factor), _multiple_of_8(height * factor)
        left, top = (new_width - width) // 2, (new_height - height) // 2
        box = (left, top, left + width, top + height)
    elif operation in PANS:
        side = PANS[operation]
        wide = side in ("left", "right")
        new_width, new_height = width + pan_step * wide, height + pan_step * (not wide)
        left = pan_step if side == "left" else 0
        top = pan_step if side == "up" else 0
        box = (left, top, left + width, top + height)
    else:
        raise ValueError(f"unknown operation {operation!r}; expected one of: {OPERATIONS}")
    if max(new_width, new_height) > max_side:
        raise OperationRefused(
            f"{label(operation)} would make a {new_width}×{new_height} image; this server's "
            f"limit is {max_side} pixels a side."
        )
    return OperationPlan(operation, new_width, new_height, box)


def available(width: int, height: int, *, max_side: int, pan_step: int) -> list[str]:
    """The operations a `width`×`height` image may take without passing `max_side`."""
    found = []
    for operation in OPERATIONS:
        try:
            plan(operation, width, height, max_side=max_side, pan_step=pan_step)
        except OperationRefused:
            continue
        found.append(operation)
    return found


def label(operation: str) -> str:
    """How a member reads an operation: on buttons, in /history, in refusals."""
    if operation in UPSCALES:
        return f"Upscale ×2 ({UPSCALES[operation]})"
    if operation in ZOOMS:
        return f"Zoom Out ×{ZOOMS[operation]:g}"
    return f"Pan {PANS[operation]}" if operation in PANS else operation


def init_image(parent: Image.Image, chosen: OperationPlan) -> Image.Image:
    """The picture the new job starts from: the parent resized ×2 (Upscale), or the parent on
    the larger canvas with the new area filled from its edges, smeared and blurred, so the
    fill already carries the nearby colours instead of black."""
    parent = parent.convert("RGB")
    if chosen.keep_box is None:
        return parent.resize((chosen.width, chosen.height), Image.Resampling.LANCZOS)
    left, top, right, bottom = chosen.keep_box
    pads = ((top, chosen.height - bottom), (left, chosen.width - right), (0, 0))
    smeared = Image.fromarray(np.pad(np.asarray(parent), pads, mode="edge"))
    radius = max(4, max(max(pads[0]), max(pads[1])) // 4)
    canvas = smeared.filter(ImageFilter.GaussianBlur(radius))
    canvas.paste(parent, (left, top))
    return canvas


def _seam_distance(size: tuple[int, int], box: Box) -> np.ndarray:
    """Per pixel: inside `box`, the distance in pixels to the nearest side of the box that
    meets new area (sides on the canvas border meet none); outside it, -1."""
    width, height = size
    left, top, right, bottom = box
    xs, ys = np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32)
    far = float(width + height)
    dx = np.minimum(xs - left if left > 0 else far, right - 1 - xs if right < width else far)
    dy = np.minimum(ys - top if top > 0 else far, bottom - 1 - ys if bottom < height else far)
    dx, dy = np.broadcast_to(dx, (width,)), np.broadcast_to(dy, (height,))
    distance = np.minimum(dx[None, :], dy[:, None])
    inside = np.zeros((height, width), dtype=bool)
    inside[top:bottom, left:right] = True
    return np.where(inside, distance, -1.0)


def repaint_mask(size: tuple[int, int], box: Box, feather: int = FEATHER) -> Image.Image:
    """The mask the inpainting call takes (white = paint anew): all but the kept box, plus
    the feather band inside it, which the paste-back then blends."""
    distance = _seam_distance(size, box)
    return Image.fromarray(np.where(distance < feather, 255, 0).astype(np.uint8), "L")


def blend_mask(size: tuple[int, int], box: Box, feather: int = FEATHER) -> Image.Image:
    """How much of the painted result each pixel takes (255 = all): all of it outside the
    box, fading over `feather` pixels inside it, none farther in."""
    distance = _seam_distance(size, box)
    weight = np.where(distance < 0, 1.0, np.clip(1.0 - distance / feather, 0.0, 1.0))
    return Image.fromarray(np.round(weight * 255).astype(np.uint8), "L")


def paste_back(
    painted: Image.Image, canvas: Image.Image, box: Box, feather: int = FEATHER
) -> Image.Image:
    """The painted result with the parent's pixels (`canvas` inside `box`) put back: exact
    beyond the feather band, blended across it."""
    mask = blend_mask(canvas.size, box, feather)
    return Image.composite(painted.convert("RGB"), canvas.convert("RGB"), mask)


def start_picture(
    data: bytes,
    parent_size: tuple[int, int],
    chosen: OperationPlan,
    *,
    max_bytes: int,
    max_pixels: int,
) -> bytes:
    """The PNG a job of `chosen` starts from, made from the parent's delivered file `data`
    (decoded as safely as any upload, and brought back to the parent's size should it differ).
    Runs off the event loop."""
    parent = decode_upload(data, max_bytes=max_bytes, max_pixels=max_pixels)
    if parent.size != parent_size:
        parent = parent.resize(parent_size, Image.Resampling.LANCZOS)
    return png_bytes(init_image(parent, chosen))


def drawing_model(request: GenerationRequest, catalog: Catalog) -> str:
    """The model that a variation, upscale or further zoom of `request`'s image draws with:
    for a Zoom Out or Pan painted by another model's allowlisted `inpaint` model, that model
    (an inpainting UNet cannot draw from text or an image alone); else the request's own."""
    if request.mode == "inpaint":
        for entry in catalog.models.values():
            if entry.inpaint == request.model and entry.name != request.model:
                return entry.name
    return request.model


def operation_request(
    checked: GenerationRequest, chosen: OperationPlan, catalog: Catalog
) -> GenerationRequest:
    """The job an operation admits, from `checked` (the parent's options validated with the
    start picture as init image). Upscale stays image-to-image on the parent's model. Zoom Out
    and Pan paint the whole canvas from noise (no strength: every step is denoised and
    charged) with the model's allowlisted `inpaint` model, else the model itself in inpainting
    mode, keeping the parent's LoRAs that fit it and `chosen.keep_box`."""
    if chosen.keep_box is None:
        return replace(checked, operation=chosen.operation)
    entry = catalog.models.get(checked.model)
    painter = entry.inpaint if entry is not None and entry.inpaint else checked.model
    fitting = {lora.name for lora in catalog.loras_for(painter)}
    loras = checked.loras
    if painter != checked.model:
        loras = tuple(lora for lora in loras if lora[0] in fitting)
    return replace(
        checked,
        mode="inpaint",
        strength=None,
        keep_box=chosen.keep_box,
        operation=chosen.operation,
        model=painter,
        loras=loras,
    )
