"""Fuzz what members send the bot, each input ending in a clean refusal or a correct result
within a time bound. No torch, no Discord. Three targets:

- `images`: real PNG, JPEG and WebP files made here (with their metadata: PNG text chunks
  carrying `parameters`, EXIF, XMP, ICC profiles, palettes, animation), mutated byte- and
  chunk-wise, through what the bot does with an upload: `read_parameters` (the Vary paths),
  `decode_upload` and `fit_for_model` (the init image); `ImageRejected` or an image.
- `prompts`: the prompt language (flags, weights, escapes, `BREAK`, permutations) mutated with
  its own symbols, through parsing, the jobs it makes, validation and the blocklist's readings;
  `InvalidRequest` or checked requests.
- `operations`: Upscale, Zoom Out and Pan of mutated result files at random parent sizes:
  `OperationRefused`, `ImageRejected` or a start picture of the planned size.

    .venv/bin/python -m bench.fuzz_intake --count 100000 [--target prompts|operations]
"""

from __future__ import annotations

import argparse
import io
import random
import struct
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, features

from bot import operations
from bot.blocklist import find_blocked, readings
from bot.images import ImageRejected, decode_upload, fit_for_model, read_parameters
from bot.models import Catalog
from bot.prompts import parse_prompt
from bot.requests import InvalidRequest, Limits, RawOptions, validate

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
A1111_TEXT = (
    "masterpiece, a castle on a hill, (detailed:1.2)\n"
    "Negative prompt: lowres, bad hands\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3141592653, Size: 768x512, "
    'Model: v1-5, Denoising strength: 0.7, Lora hashes: "detail: 1a2b, style: 3c4d"'
)
# A last line of one long word, just under the length read (quadratic for a regex tried at
# every offset), and a text over it.
LONG_WORD_TEXT = "a prompt\n" + "w" * 19_500
OVERLONG_TEXT = "a prompt\n" + "w" * 30_000
XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/'
    '22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
    'tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>'
)
CHUNK_TYPES = (b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"iCCP", b"tRNS", b"PLTE", b"acTL", b"fcTL")
INTERESTING = (0, 1, 2, 6, 9, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF)


def _encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _exif() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate to display
    exif[0x010E] = "a description"
    exif[0x9286] = b"ASCII\x00\x00\x00" + A1111_TEXT.encode()  # UserComment, as A1111 writes
    return exif


def _png_text(text: str, how: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if how == "itxt":
        info.add_itxt("parameters", text, zip=True)
    else:
        info.add_text("parameters", text, zip=how == "ztxt")
    return info


def seed_files() -> dict[str, bytes]:
    """The files every mutation starts from, small so that thousands run in seconds."""
    rgb, rgba = _noise(72, 64, 1), _noise(64, 80, 2).convert("RGBA")
    rgba.putalpha(128)
    xmp_info = PngImagePlugin.PngInfo()
    xmp_info.add_itxt("XML:com.adobe.xmp", XMP)
    files = {
        "png-text": _encode(rgb, "PNG", pnginfo=_png_text(A1111_TEXT, "text")),
        "png-ztxt": _encode(rgb, "PNG", pnginfo=_png_text(A1111_TEXT, "ztxt")),
        "png-itxt": _encode(rgb, "PNG", pnginfo=_png_text(A1111_TEXT, "itxt")),
        "png-long-word": _encode(rgb, "PNG", pnginfo=_png_text(LONG_WORD_TEXT, "ztxt")),
        "png-overlong": _encode(rgb, "PNG", pnginfo=_png_text(OVERLONG_TEXT, "itxt")),
        "png-exif-xmp": _encode(rgba, "PNG", exif=_exif(), pnginfo=xmp_info),
        "png-palette": _encode(rgb.quantize(16), "PNG", transparency=0),
        "png-16bit": _encode(Image.new("I;16", (64, 64), 40000), "PNG"),
        "png-la": _encode(rgba.convert("LA"), "PNG"),
        "apng": _encode(rgb, "PNG", save_all=True, append_images=[_noise(72, 64, 3)]),
        "jpeg-exif": _encode(rgb, "JPEG", exif=_exif(), xmp=XMP.encode()),
        "jpeg-progressive": _encode(rgb, "JPEG", progressive=True, quality=70),
        "jpeg-cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
        "jpeg-grey": _encode(rgb.convert("L"), "JPEG", exif=_exif()),
    }
    if features.check("webp"):
        files["webp-lossy"] = _encode(rgb, "WEBP", exif=_exif(), xmp=XMP.encode())
        files["webp-lossless"] = _encode(rgba, "WEBP", lossless=True, exif=_exif())
        files["webp-animated"] = _encode(
            rgb, "WEBP", save_all=True, append_images=[_noise(72, 64, 4)]
        )
    return files


# ---- mutations ------------------------------------------------------------------------------


def _position(data: bytearray, rng: random.Random) -> int:
    """Where to mutate: half the time within the headers and metadata at the front."""
    end = min(len(data), 600) if rng.random() < 0.5 else len(data)
    return rng.randrange(max(end, 1))


def _flip_bit(data: bytearray, rng: random.Random, others: list[bytes]) -> bytearray:
    if data:
        data[_position(data, rng) % len(data)] ^= 1 << rng.randrange(8)
    return data


def _interesting_int(data: bytearray, rng: random.Random, others: list[bytes]) -> bytearray:
    width = rng.choice((1, 2, 4))
    at = _position(data, rng)
    value = rng.choice(INTERESTING) & ((1 << 8 * width) - 1)
    data[at : at + width] = value.to_bytes(width, rng.choice(("big", "little")))
    return data


def _insert(data: bytearray, rng: random.Random, others: list[bytes]) -> bytearray:
    data[_position(data, rng) : 0] = rng.randbytes(rng.randint(1, 16))
    return data


def _delete(data: bytearray, rng: random.Random, others: list[bytes]) -> bytearray:
    at = _position(data, rng)
    del data[at : at + rng.randint(1, 64)]
    return data


def _duplicate(data: bytearray, rng: random.Random, others: list[bytes]) -> bytearray:
    at, size = _position(data, rng), rng.randint(1, 256)
    data[_position(data, rng) : 0] = data[at : at + size]
    return data


def _truncate(data: bytearray, rng: random.Random, others: list[bytes]) -> bytearray:
    return data[: _position(data, rng)]


def _splice(data: bytearray, rng: random.Random, others: list[bytes]) -> bytearray:
    other = rng.choice(others)
    at = rng.randrange(len(other))
    data[_position(data, rng) :] = other[at:]
    return data


def _chunks(data: bytes) -> list[tuple[int, int]]:
    """(offset, length of data) of each well-framed PNG chunk, in order."""
    found, at = [], len(PNG_SIGNATURE)
    while at + 12 <= len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        if at + 12 + length > len(data):
            break
        found.append((at, length))
        at += 12 + length
    return found


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_chunk(data: bytearray, rng: random.Random, others: list[bytes]) -> bytearray:
    """Change one chunk's body (or add a new chunk) and fix its length and CRC, so the change
    gets past Pillow's CRC check into the chunk's parser."""
    chunks = _chunks(data) if data.startswith(PNG_SIGNATURE) else []
    if not chunks:
        return _flip_bit(data, rng, others)
    at, length = rng.choice(chunks)
    if rng.random() < 0.3:
        kind = rng.choice(CHUNK_TYPES)
        data[at:at] = _chunk(kind, zlib.compress(rng.randbytes(rng.randint(0, 64))))
        return data
    kind, body = bytes(data[at + 4 : at + 8]), bytearray(data[at + 8 : at + 8 + length])
    body = rng.choice(BYTE_MUTATIONS)(body, rng, others)
    data[at : at + 12 + length] = _chunk(kind, bytes(body))
    return data


def _exif_field(data: bytearray, rng: random.Random, others: list[bytes]) -> bytearray:
    """Retype one tag of the first EXIF directory in place (type, count or value), the sort of
    block that made Pillow's EXIF rewriting raise; sizes are kept, so a JPEG stays framed."""
    tiff = max(data.find(b"II*\x00"), data.find(b"MM\x00*"))
    if tiff < 0 or tiff + 10 > len(data):
        return _flip_bit(data, rng, others)
    order = "<" if data[tiff] == ord("I") else ">"
    directory = tiff + struct.unpack(order + "I", data[tiff + 4 : tiff + 8])[0]
    if directory + 2 > len(data):
        return _flip_bit(data, rng, others)
    (entries,) = struct.unpack(order + "H", data[directory : directory + 2])
    entry = directory + 2 + 12 * rng.randrange(max(1, min(entries, 64)))
    if entry + 12 > len(data):
        return _flip_bit(data, rng, others)
    field_at, size, value = rng.choice(
        (
            (2, 2, rng.randint(0, 18)),
            (4, 4, rng.choice(INTERESTING)),
            (8, 4, rng.choice(INTERESTING)),
        )
    )
    data[entry + field_at : entry + field_at + size] = struct.pack(
        order + ("H" if size == 2 else "I"), value & ((1 << 8 * size) - 1)
    )
    return data


BYTE_MUTATIONS: tuple[Callable[[bytearray, random.Random, list[bytes]], bytearray], ...] = (
    _flip_bit,
    _interesting_int,
    _insert,
    _delete,
    _duplicate,
    _truncate,
    _splice,
)
MUTATIONS = (*BYTE_MUTATIONS, _png_chunk, _png_chunk, _png_chunk, _exif_field, _exif_field)


def mutate(data: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """One to four stacked mutations of `data`."""
    mutated = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 4))):
        mutated = rng.choice(MUTATIONS)(mutated, rng, others)
    return bytes(mutated)


# ---- the intake -----------------------------------------------------------------------------


def intake(data: bytes, limits: Limits, *, max_bytes: int, max_pixels: int) -> str:
    """What the bot does with a member's file: its parameters (Vary), then the init image.
    Returns the outcome; anything raised other than ImageRejected is a bug."""
    parameters = read_parameters(data)
    assert parameters is None or isinstance(parameters, dict), parameters
    try:
        image = decode_upload(data, max_bytes=max_bytes, max_pixels=max_pixels)
    except ImageRejected:
        return "rejected"
    fitted = fit_for_model(image, limits)
    assert fitted.mode == "RGB" and fitted.width % 8 == fitted.height % 8 == 0, fitted
    return "accepted" if parameters is None else "accepted with parameters"


# ---- the prompt language ------------------------------------------------------------------

PROMPT_SEEDS = (
    "a castle on a hill",
    "a (red:1.3) [blue] ((castle)) on a hill BREAK at night",
    "a {red, blue, green} {car, boat} --ar 3:2 --no blur, text --seed 7",
    "portrait \\(detail\\) --steps 20 --cfg 6 --scheduler euler_a --repeat 2",
    "(nu:1)de {nu,xx}de nu(:1)de [nu]de",
    "a fox --count 2 --strength 0.5 --model tiny --lora x:0.5",
)
PROMPT_SYMBOLS = (
    "(", ")", "[", "]", "{", "}", ",", ":", "\\", "--", "—", " BREAK ", ":1.3", ":-1", ":9e99",
    "--ar 16:9", "--ar 0:0", "--no ", "--seed ", "--repeat 9", "--count 99", "\u0301", "\u200b",
    "\x00", "@everyone", "ｎｕｄｅ", "9" * 40, "{" * 30, "(" * 50, " ",
)  # fmt: skip
BLOCKED = ["nude"]


def mutate_prompt(text: str, rng: random.Random) -> str:
    """One to six edits with the language's own symbols: insert, delete, or repeat a piece."""
    for _ in range(rng.randint(1, 6)):
        at = rng.randint(0, len(text))
        edit = rng.random()
        if edit < 0.6:
            text = text[:at] + rng.choice(PROMPT_SYMBOLS) + text[at:]
        elif edit < 0.8:
            text = text[:at] + text[at + rng.randint(1, 8) :]
        else:
            text = text[:at] + text[at : at + rng.randint(1, 12)] * rng.randint(2, 40) + text[at:]
    return text


def prompt_intake(text: str, limits: Limits, catalog: Catalog) -> str:
    """What the bot does with a typed prompt before admission: parse, make the jobs, validate
    each, read each as the blocklist does. InvalidRequest is a refusal; anything else a bug."""
    try:
        parsed = parse_prompt(text, 16)
        requests = [
            validate(raw, limits, catalog) for raw in parsed.requests(RawOptions(text), limits)
        ]
    except InvalidRequest:
        return "refused"
    for request in requests:
        for reading in readings(request.prompt):
            find_blocked(reading, BLOCKED)
    return f"accepted ({min(len(requests), 4)}{'+' if len(requests) > 4 else ''} jobs)"


# ---- Upscale, Zoom Out, Pan -----------------------------------------------------------------


def operation_intake(data: bytes, rng: random.Random, *, max_bytes: int, max_pixels: int) -> str:
    """An operation on a result file at a random parent size, as the buttons run it."""
    operation = rng.choice(operations.OPERATIONS)
    parent = (rng.choice((64, 256, 512, 640, 1024)), rng.choice((64, 256, 512, 768, 1024)))
    try:
        chosen = operations.plan(operation, *parent, max_side=1024, pan_step=256)
        png = operations.start_picture(
            data, parent, chosen, max_bytes=max_bytes, max_pixels=max_pixels
        )
    except operations.OperationRefused:
        return "refused: too large"
    except ImageRejected:
        return "rejected"
    with Image.open(io.BytesIO(png)) as made:
        assert made.size == (chosen.width, chosen.height), (made.size, chosen)
    return "accepted"


@dataclass
class FuzzReport:
    count: int = 0
    outcomes: Counter = field(default_factory=Counter)
    failures: list[tuple[str, str, bytes]] = field(default_factory=list)  # seed, error, input
    slowest: float = 0.0
    slowest_seed: str = ""
    total: float = 0.0

    def lines(self) -> list[str]:
        lines = [f"inputs: {self.count:,}"]
        lines += [f"  {name}: {n:,}" for name, n in sorted(self.outcomes.items())]
        lines.append(f"slowest input: {self.slowest * 1000:.1f} ms (from {self.slowest_seed})")
        lines.append(f"total: {self.total:.1f} s")
        return lines


def fuzz(
    count: int,
    *,
    seed: int = 0,
    target: str = "images",
    max_bytes: int = 10 * 2**20,
    max_pixels: int = 4096 * 4096,
    stop_after: float | None = None,
) -> FuzzReport:
    """Run `count` mutated inputs of `target`; an input slower than `stop_after` seconds stops
    the run (recorded as a failure), so a test fails at the first slow input instead of timing
    out."""
    rng = random.Random(seed)
    run_one = _target(target, rng, max_bytes=max_bytes, max_pixels=max_pixels)
    report = FuzzReport()
    started = time.perf_counter()
    for _ in range(count):
        began = time.perf_counter()
        name, data, outcome = run_one()
        spent = time.perf_counter() - began
        if outcome.startswith("error: "):
            error = outcome.removeprefix("error: ")
            report.failures.append((name, error, data))
            outcome = "error: " + error.split(":")[0]
        report.count += 1
        report.outcomes[outcome] += 1
        if spent > report.slowest:
            report.slowest, report.slowest_seed = spent, name
        if stop_after is not None and spent > stop_after:
            report.failures.append((name, f"took {spent:.2f} s", data))
            break
    report.total = time.perf_counter() - started
    return report


def _target(
    target: str, rng: random.Random, *, max_bytes: int, max_pixels: int
) -> Callable[[], tuple[str, bytes, str]]:
    """One fuzzing step of `target`: (seed name, input, outcome or "error: ...")."""
    seeds = seed_files()
    names, files = list(seeds), list(seeds.values())
    limits, catalog = Limits(), Catalog.single("tiny")

    def guarded(name: str, data: bytes, run: Callable[[], str]) -> tuple[str, bytes, str]:
        try:
            return name, data, run()
        except Exception as error:  # what the fuzzer is for: record it and go on
            return name, data, f"error: {type(error).__name__}: {error}"

    def image_step() -> tuple[str, bytes, str]:
        name = rng.choice(names)
        data = mutate(seeds[name], rng, files)
        if target == "operations":
            step = partial(operation_intake, data, rng, max_bytes=max_bytes, max_pixels=max_pixels)
        else:
            step = partial(intake, data, limits, max_bytes=max_bytes, max_pixels=max_pixels)
        return guarded(name, data, step)

    def prompt_step() -> tuple[str, bytes, str]:
        text = mutate_prompt(rng.choice(PROMPT_SEEDS), rng)
        return guarded("prompt", text.encode(), partial(prompt_intake, text, limits, catalog))

    if target not in ("images", "prompts", "operations"):
        raise ValueError(f"unknown target {target!r}")
    return prompt_step if target == "prompts" else image_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", choices=("images", "prompts", "operations"), default="images")
    parser.add_argument("--save", type=Path, help="write each failing input to this folder")
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # Pillow warns on most damaged files; outcomes say enough
    report = fuzz(args.count, seed=args.seed, target=args.target)
    print("\n".join(report.lines()))
    for index, (name, error, data) in enumerate(report.failures):
        print(f"FAILED ({name}): {error}")
        if args.save:
            args.save.mkdir(parents=True, exist_ok=True)
            (args.save / f"failure-{index}-{name}.bin").write_bytes(data)
    raise SystemExit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
