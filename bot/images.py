"""Image encoding for delivery: PNGs that carry their parameters, and grids of several images."""

from __future__ import annotations

import io
import math

from PIL import Image, PngImagePlugin

from bot.requests import GenerationRequest


def parameters_text(request: GenerationRequest, seed: int) -> str:
    """The `parameters` text AUTOMATIC1111 writes, so other tools can read our PNGs back."""
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    fields = [
        f"Steps: {request.steps}",
        f"Sampler: {request.scheduler}",
        f"CFG scale: {request.guidance:g}",
        f"Seed: {seed}",
        f"Size: {request.width}x{request.height}",
        f"Model: {request.model}",
    ]
    if request.strength is not None:
        fields.append(f"Denoising strength: {request.strength:g}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def grid(images: list[Image.Image]) -> Image.Image:
    """Lay images out in a near-square grid (2×2 for four), in seed order."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet
