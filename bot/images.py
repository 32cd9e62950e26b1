"""Images in and out: safe decoding of members' uploads, PNGs that carry their parameters
(AUTOMATIC1111's `parameters` text, written and read back), and grids of several images."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import struct
from typing import Any

from PIL import ExifTags, Image, ImageOps, PngImagePlugin

from bot.requests import GenerationRequest, Limits, fitted_size

# Smallest side we accept: below this an init image carries next to nothing.
MIN_UPLOAD_SIDE = 64
ALLOWED_FORMATS = "PNG, JPEG or WebP"
# What Pillow raises on broken files: its own errors are OSError or SyntaxError, its
# decoders add ValueError, EOFError and struct.error on some truncations, and its chunk and
# tag parsers IndexError or KeyError on short or unknown fields (found by bench/fuzz_intake.py).
_UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, struct.error, LookupError)


class ImageRejected(ValueError):
    """An upload we will not use; the message is shown to the member as it is."""


def _sniff(data: bytes) -> str | None:
    """The format by its magic number, whatever the file is called."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _too_many_pixels(max_pixels: int, size: tuple[int, int] | None = None) -> ImageRejected:
    shown = f" ({size[0]}×{size[1]})" if size else ""
    return ImageRejected(
        f"The image has too many pixels{shown}; the limit is {max_pixels:,} pixels "
        f"(about {max_pixels / 1e6:.1f} megapixels). Send a smaller image."
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB whatever came in: transparency on white, 16-bit grey scaled (not clipped) to 8 bits."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        image = image.convert("I").point(lambda v: v * (1 / 257)).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_upload(
    data: bytes, *, max_bytes: int, max_pixels: int, min_side: int = MIN_UPLOAD_SIDE
) -> Image.Image:
    """Decode a member's upload into an upright RGB image, or raise ImageRejected naming the
    problem. Size, format and pixel count are checked before any pixel is decoded."""
    if len(data) > max_bytes:
        raise ImageRejected(
            f"The file is {len(data) / 2**20:.1f} MiB; the limit is {max_bytes / 2**20:g} MiB."
        )
    kind = _sniff(data)
    if kind is None:
        raise ImageRejected(f"That file is not an image we accept; send a {ALLOWED_FORMATS}.")
    try:
        image = Image.open(io.BytesIO(data), formats=[kind])  # lazy: reads the header only
    except Image.DecompressionBombError as error:
        raise _too_many_pixels(max_pixels) from error
    except _UNREADABLE as error:
        raise ImageRejected(f"The image could not be read (a damaged {kind} file?).") from error
    width, height = image.size
    if width * height > max_pixels:
        raise _too_many_pixels(max_pixels, image.size)
    if min(width, height) < min_side:
        raise ImageRejected(
            f"The image is {width}×{height} pixels; each side must be at least {min_side}."
        )
    if kind in ("PNG", "WEBP") and getattr(image, "n_frames", 1) > 1:
        raise ImageRejected(f"Animated images are not accepted; send a still {ALLOWED_FORMATS}.")
    try:
        image.load()
        return _to_rgb(_upright(image))  # a damaged palette or tRNS chunk fails here
    except ImageRejected:
        raise
    except Image.DecompressionBombError as error:
        raise _too_many_pixels(max_pixels, image.size) from error
    except _UNREADABLE as error:
        raise ImageRejected(
            f"The image could not be read (a truncated or damaged {kind} file?)."
        ) from error


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _upright(image: Image.Image) -> Image.Image:
    """Turn the image as its EXIF Orientation says. Not ImageOps.exif_transpose: it also
    rewrites the EXIF block, and on a malformed one raises TypeError, KeyError, OverflowError
    and more; the metadata is dropped here anyway."""
    try:
        orientation = image.getexif().get(ExifTags.Base.Orientation)
    except (*_UNREADABLE, TypeError, AttributeError) as error:
        raise ImageRejected(
            "The image's EXIF metadata is damaged; save it again without EXIF, or as a PNG."
        ) from error
    method = _TRANSPOSE.get(orientation) if type(orientation) is int else None
    return image if method is None else image.transpose(method)


def fit_for_model(image: Image.Image, limits: Limits) -> Image.Image:
    """Resized (and an extreme ratio centre-cropped) to the size it is drawn at with `limits`,
    a model's (`fitted_size`)."""
    return resized(image, fitted_size(*image.size, limits))


def resized(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """`image` at `size`, centre-cropped where the aspect ratios differ, never stretched."""
    if image.size == size:
        return image
    return ImageOps.fit(image, size, Image.Resampling.LANCZOS)


def _quote(value: str) -> str:
    """AUTOMATIC1111's rule: values with a comma, colon or newline are written as JSON strings."""
    return json.dumps(value, ensure_ascii=False) if re.search(r"[,:\n]", value) else value


def parameters_text(request: GenerationRequest, seed: int) -> str:
    """The `parameters` text AUTOMATIC1111 writes, so other tools can read our PNGs back: the
    LoRAs as its `<lora:name:weight>` tags after the prompt, the model as `Model:`."""
    tags = "".join(f" <lora:{name}:{weight:g}>" for name, weight in request.loras)
    lines = [request.prompt + tags]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    fields = [
        f"Steps: {request.steps}",
        f"Sampler: {_quote(request.scheduler)}",
        f"CFG scale: {request.guidance:g}",
        f"Seed: {seed}",
        f"Size: {request.width}x{request.height}",
        f"Model: {_quote(request.model)}",
    ]
    if request.strength is not None:
        fields.append(f"Denoising strength: {request.strength:g}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


# zlib level 1 instead of Pillow's 6: on diffusion-like pictures it encodes 3x faster at 512²
# and 1024² for files 16 % larger (bench/png.py, docs/performance.md). Encoding is the bot
# process's main CPU cost per image, and every delivery waits for it.
PNG_COMPRESS_LEVEL = 1


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


def read_png(data: bytes, size: tuple[int, int] | None = None) -> Image.Image:
    """An image this bot stored itself (already checked when it arrived), at `size` if given
    (see `resized`)."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    return rgb if size is None else resized(rgb, size)


def grid(images: list[Image.Image]) -> Image.Image:
    """Lay images out in a near-square grid (2×2 for four), in seed order."""
    columns = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    sheet = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        sheet.paste(image, ((index % columns) * width, (index // columns) * height))
    return sheet


# Longer than any real `parameters` text (A1111 writes a few thousand characters at most); a
# member's PNG can carry a megabyte, which is not read at all.
MAX_PARAMETERS_CHARS = 20_000
# The fields line is `Key: value, Key: "JSON string", ...`. It is scanned colon by colon: a
# regex for `Key:` tried at every offset would be quadratic in a long run of word characters.
_KEY_CHARS = re.compile(r"[\w \-/+.]*")  # matched on the reversed text before a colon
_VALUE = re.compile(r'\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_SIZE = re.compile(r"^(\d+)x(\d+)$")
# A1111's LoRA tag; bounded runs without `<`, `>` or `:` in the name, so it matches in linear time.
_LORA_TAG = re.compile(r"<lora:([^<>:\s]{1,100})(?::(-?\d{1,3}(?:\.\d{1,6})?))?>")
_FIELDS: dict[str, tuple[str, Any]] = {
    "Steps": ("steps", int),
    "Sampler": ("sampler", str),
    "CFG scale": ("cfg_scale", float),
    "Seed": ("seed", int),
    "Model": ("model", str),
    "Denoising strength": ("strength", float),
}


def _fields(line: str) -> list[tuple[str, str]]:
    """The (key, raw value) pairs of a fields line, in one pass: each key is the run of key
    characters before a colon, from its first word character; text between fields is skipped."""
    fields: list[tuple[str, str]] = []
    start = 0
    while (colon := line.find(":", start)) >= 0:
        before = line[start:colon][::-1]
        key = before[: _KEY_CHARS.match(before).end()][::-1].lstrip(" -/+.")
        if not key:
            start = colon + 1
            continue
        value = _VALUE.match(line, colon + 1)
        fields.append((key, value[1]))
        start = value.end()
    return fields


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse AUTOMATIC1111's `parameters` text: prompt lines, optional `Negative prompt:` lines,
    then one line of `Key: value` fields. Unknown fields land in `extra` as text; the prompt's
    `<lora:name:weight>` tags in `loras`, as (name, weight) pairs, unchecked."""
    *lines, last = text.strip().split("\n")
    fields = _fields(last)
    if len(fields) < 3:  # no fields line: it is all prompt
        lines, fields = [*lines, last], []
    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        if not negative and line.startswith("Negative prompt:"):
            negative.append(line.removeprefix("Negative prompt:").strip())
        else:
            (negative if negative else prompt).append(line.strip())
    text = "\n".join(prompt)
    loras = [(name, float(weight or 1)) for name, weight in _LORA_TAG.findall(text)]
    result: dict[str, Any] = {
        "prompt": _LORA_TAG.sub("", text).strip(),
        "negative_prompt": "\n".join(negative).strip(),
    }
    if loras:
        result["loras"] = loras
    extra: dict[str, str] = {}
    for name, raw in fields:
        value = raw.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
        try:
            if name == "Size" and (size := _SIZE.match(value)):
                result["width"], result["height"] = int(size[1]), int(size[2])
            elif name in _FIELDS:
                key, convert = _FIELDS[name]
                result[key] = convert(value)
            else:
                extra[name] = value
        except ValueError:
            extra[name] = value
    result["extra"] = extra
    return result


def read_parameters(source: bytes | Image.Image) -> dict[str, Any] | None:
    """The parameters a PNG carries (ours or AUTOMATIC1111's), or None when it has none, is not
    a PNG or carries more than MAX_PARAMETERS_CHARS. Reads the header only, no pixels; linear
    in the file's size, but call it off the event loop: a member's PNG can hold a megabyte."""
    if isinstance(source, bytes | bytearray):
        if _sniff(source) != "PNG":  # only PNG text chunks carry `parameters`
            return None
        try:
            with Image.open(io.BytesIO(source), formats=["PNG"]) as image:
                text = image.info.get("parameters")
        except (*_UNREADABLE, Image.DecompressionBombError):
            return None
    else:
        text = source.info.get("parameters")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_PARAMETERS_CHARS:
        return None
    return parse_parameters(text)
