"""Upload intake, resizing for the model and PNG parameters; every file is made here in code."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from factories import make_request
from PIL import Image, ImageFile, features
from PIL.PngImagePlugin import PngInfo

from bot.images import (
    MAX_PARAMETERS_CHARS,
    ImageRejected,
    decode_upload,
    fit_for_model,
    parameters_text,
    parse_parameters,
    png_bytes,
    read_parameters,
)
from bot.requests import GenerationRequest, Limits, fitted_size

MIB = 2**20
LIMITS = {"max_bytes": 8 * MIB, "max_pixels": 4096 * 4096}


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_claiming(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR is patched to claim another size (CRC fixed up)."""
    data = bytearray(encode(Image.new("RGB", (64, 64), "red"), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def with_chunk(png: bytes, after: bytes, kind: bytes, body: bytes) -> bytes:
    """`png` with a chunk (CRC and all) inserted after its first `after` chunk."""
    at = 8
    while png[at + 4 : at + 8] != after:
        at += 12 + struct.unpack(">I", png[at : at + 4])[0]
    at += 12 + struct.unpack(">I", png[at : at + 4])[0]
    chunk = struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return png[:at] + chunk + png[at:]


def freezing_png() -> bytes:
    """About a kilobyte of PNG whose zTXt `parameters` inflate to a million characters, the
    last line one long word: hours of work for a regex that retries at every offset."""
    info = PngInfo()
    info.add_text("parameters", "a prompt\n" + "w" * 999_990, zip=True)
    data = encode(Image.new("RGB", (64, 64), "grey"), "PNG", pnginfo=info, optimize=True)
    assert len(data) < 4096
    return data


def rejected(data: bytes, match: str, **limits: int) -> ImageRejected:
    with pytest.raises(ImageRejected, match=match) as caught:
        decode_upload(data, **{**LIMITS, **limits})
    return caught.value


def test_a_plain_png_jpeg_and_webp_are_accepted() -> None:
    source = noise(96, 80)
    fmts = ["PNG", "JPEG"] + (["WEBP"] if features.check("webp") else [])
    for fmt in fmts:
        image = decode_upload(encode(source, fmt), **LIMITS)
        assert image.mode == "RGB" and image.size == (96, 80), fmt
    assert np.array_equal(np.asarray(decode_upload(encode(source, "PNG"), **LIMITS)), source)


def test_a_header_claiming_a_huge_image_is_refused_before_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    started = time.perf_counter()
    # Past twice Pillow's own MAX_IMAGE_PIXELS: its bomb guard fires inside Image.open.
    error = rejected(png_claiming(20000, 20000), "too many pixels")
    assert "16,777,216 pixels" in str(error)
    # Below Pillow's guard but over ours: our check on the header refuses it.
    error = rejected(png_claiming(5000, 5000), "too many pixels", max_pixels=1_000_000)
    assert "5000×5000" in str(error) and "1,000,000 pixels" in str(error)
    assert time.perf_counter() - started < 1


def test_formats_are_judged_by_their_bytes(tmp_path: Path) -> None:
    fake = tmp_path / "cat.png"
    fake.write_text("just some text, named like a picture\n")
    rejected(fake.read_bytes(), "PNG, JPEG or WebP")
    rejected(b"", "PNG, JPEG or WebP")
    frames = [Image.new("P", (64, 64), i) for i in range(3)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    rejected(gif, "PNG, JPEG or WebP")
    # A JPEG named .png is a JPEG: accepted.
    assert decode_upload(encode(noise(64, 64), "JPEG"), **LIMITS).size == (64, 64)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animations_are_refused(fmt: str) -> None:
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    frames = [noise(64, 64, seed) for seed in range(3)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 3
    rejected(data, "Animated images are not accepted")


def test_truncated_and_corrupt_files_are_refused() -> None:
    jpeg = encode(noise(256, 256), "JPEG", quality=95)
    rejected(jpeg[: len(jpeg) // 2], "could not be read")
    png = encode(noise(128, 128), "PNG")
    rejected(png[:200], "could not be read")
    rejected(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "could not be read")


def test_tiny_images_are_refused() -> None:
    error = rejected(encode(Image.new("RGB", (1, 1)), "PNG"), "at least 64")
    assert "1×1" in str(error)
    rejected(encode(Image.new("RGB", (640, 63)), "PNG"), "640×63")


def test_files_over_the_size_limit_are_refused() -> None:
    data = encode(noise(64, 64), "PNG")
    error = rejected(data + b"\x00" * MIB, "the limit is 1 MiB", max_bytes=MIB)
    assert "1.0 MiB" in str(error)


def test_cmyk_jpeg_becomes_rgb() -> None:
    red = Image.new("CMYK", (64, 64), (0, 255, 255, 0))
    image = decode_upload(encode(red, "JPEG", quality=95), **LIMITS)
    assert image.mode == "RGB"
    r, g, b = image.getpixel((32, 32))
    assert r > 240 and g < 15 and b < 15


def test_exif_orientation_is_applied() -> None:
    source = Image.new("RGB", (120, 80), "white")
    source.paste((255, 0, 0), (0, 0, 20, 20))  # a red marker at the top left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    image = decode_upload(encode(source, "JPEG", quality=95, exif=exif), **LIMITS)
    assert image.size == (80, 120)
    marker = np.asarray(image)[5:15, 65:75].mean(axis=(0, 1))  # now at the top right
    assert marker[0] > 200 and marker[1] < 60 and marker[2] < 60
    assert np.asarray(image)[5:15, 5:15].min() > 200  # the top left is white


def test_a_malformed_exif_block_is_ignored_but_the_orientation_applied() -> None:
    # Orientation 6, then YResolution typed UNDEFINED: exif_transpose, rewriting the block,
    # raised TypeError ("bad operand type for abs(): 'bytes'").
    tiff = b"II*\x00" + struct.pack("<IH", 8, 2)
    tiff += struct.pack("<HHI", 0x0112, 3, 1) + b"\x06\x00\x00\x00"
    tiff += struct.pack("<HHI", 0x011B, 7, 2) + b"D\xb0\x00\x00" + b"\x00" * 4
    app1 = b"Exif\x00\x00" + tiff
    jpeg = encode(Image.new("RGB", (120, 80), "white"), "JPEG")
    data = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:]
    assert decode_upload(data, **LIMITS).size == (80, 120)


def test_a_palette_with_too_many_transparent_entries_is_refused() -> None:
    palette = encode(noise(64, 64).quantize(4), "PNG")
    rejected(with_chunk(palette, b"PLTE", b"tRNS", b"\x00" * 300), "could not be read")


def test_a_damaged_chunk_after_the_pixels_is_refused() -> None:
    # An iCCP chunk after IDAT, cut after its name: Pillow's parser raised IndexError.
    png = encode(noise(64, 64), "PNG")
    rejected(with_chunk(png, b"IDAT", b"iCCP", b"icc\x00"), "could not be read")


def test_transparency_is_composited_on_white() -> None:
    rgba = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 128), (0, 0, 32, 64))
    image = decode_upload(encode(rgba, "PNG"), **LIMITS)
    assert image.mode == "RGB"
    assert image.getpixel((48, 10)) == (255, 255, 255)
    r, g, b = image.getpixel((10, 10))
    assert r == 255 and 120 <= g == b <= 135
    la = Image.new("LA", (64, 64), (0, 0))
    assert decode_upload(encode(la, "PNG"), **LIMITS).getpixel((0, 0)) == (255, 255, 255)


def test_palette_and_16_bit_images_become_rgb() -> None:
    palette = noise(64, 64).quantize(16)
    assert palette.mode == "P"
    image = decode_upload(encode(palette, "PNG"), **LIMITS)
    assert image.mode == "RGB"
    assert np.array_equal(np.asarray(image), np.asarray(palette.convert("RGB")))
    holed = Image.new("P", (64, 64), 1)
    holed.putpalette([0, 0, 0, 0, 0, 255])
    holed.info["transparency"] = 1
    assert decode_upload(encode(holed, "PNG"), **LIMITS).getpixel((0, 0)) == (255, 255, 255)
    grey16 = Image.new("I;16", (64, 64), 40000)
    assert decode_upload(encode(grey16, "PNG"), **LIMITS).getpixel((0, 0)) == (155, 155, 155)


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1000, 1000), (512, 512)),
        ((3000, 2000), (624, 416)),
        ((600, 1200), (360, 728)),
        ((64, 64), (512, 512)),
        ((5000, 500), (1024, 256)),  # too wide for the bounds: cropped, not stretched
        ((100, 4000), (256, 1024)),
    ],
)
def test_fit_for_model(size: tuple[int, int], expected: tuple[int, int]) -> None:
    limits = Limits(min_side=256, max_side=1024, default_width=512, default_height=512)
    fitted = fit_for_model(noise(*size), limits)
    assert fitted_size(*size, limits) == expected
    width, height = fitted.size
    assert fitted.size == expected
    assert width % 8 == 0 and height % 8 == 0
    assert min(width, height) >= 256 and max(width, height) <= 1024
    if 0.25 <= size[0] / size[1] <= 4:
        assert abs(width / height - size[0] / size[1]) < 0.05
        assert abs(width * height - 512 * 512) < 0.1 * 512 * 512


def request(**changes: object) -> GenerationRequest:
    return make_request(
        **{
            "prompt": "a red cat, oil painting: warm light",
            "negative_prompt": "blurry, people",
            "seed": 1234,
            "height": 768,
            "scheduler": "DPM++ 2M",
            "model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
            **changes,
        }
    )


@pytest.mark.parametrize(
    "req",
    [
        request(),
        request(negative_prompt="", mode="image", strength=0.55),
        request(model="C:\\models\\my, model", guidance=0.0),
        request(model="sd15", loras=(("ink", -1.5), ("pixel-art", 0.8))),
    ],
)
def test_parameters_round_trip_through_a_png(req: GenerationRequest) -> None:
    data = png_bytes(Image.new("RGB", (64, 64)), parameters_text(req, req.seed + 1))
    with Image.open(io.BytesIO(data)) as image:
        assert image.info["parameters"] == parameters_text(req, req.seed + 1)
    parsed = read_parameters(data)
    assert parsed is not None
    assert parsed == {
        "prompt": req.prompt,
        "negative_prompt": req.negative_prompt,
        "steps": req.steps,
        "sampler": req.scheduler,
        "cfg_scale": req.guidance,
        "seed": req.seed + 1,
        "width": req.width,
        "height": req.height,
        "model": req.model,
        **({} if req.strength is None else {"strength": req.strength}),
        **({"loras": list(req.loras)} if req.loras else {}),
        "extra": {},
    }


def test_lora_tags_are_read_from_anywhere_in_the_prompt() -> None:
    parsed = parse_parameters(
        "<lora:detail:0.6> a castle, <lora:style-v2> at dusk <lora:bad name:1> <lora:x:nan>\n"
        "Steps: 30, Sampler: Euler, Seed: 3"
    )
    assert parsed["loras"] == [("detail", 0.6), ("style-v2", 1.0)]
    assert "<lora:detail" not in parsed["prompt"] and "<lora:style" not in parsed["prompt"]
    assert parsed["prompt"].startswith("a castle,") and "at dusk" in parsed["prompt"]


def test_automatic1111_text_parses() -> None:
    text = (
        "masterpiece, a castle on a hill,\n"
        "sunset, (detailed:1.2)\n"
        "Negative prompt: lowres, bad hands\n"
        "watermark\n"
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3141592653, "
        "Size: 768x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, "
        'Denoising strength: 0.7, Clip skip: 2, Lora hashes: "detail: 1a2b, style: 3c4d", '
        "Version: v1.10.1"
    )
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "masterpiece, a castle on a hill,\nsunset, (detailed:1.2)"
    assert parsed["negative_prompt"] == "lowres, bad hands\nwatermark"
    assert parsed["steps"] == 30 and parsed["sampler"] == "DPM++ 2M Karras"
    assert parsed["cfg_scale"] == 6.5 and parsed["seed"] == 3141592653
    assert (parsed["width"], parsed["height"]) == (768, 512)
    assert parsed["model"] == "v1-5-pruned-emaonly" and parsed["strength"] == 0.7
    assert parsed["extra"] == {
        "Model hash": "6ce0161689",
        "Clip skip": "2",
        "Lora hashes": "detail: 1a2b, style: 3c4d",
        "Version": "v1.10.1",
    }


def test_prompt_only_and_missing_parameters() -> None:
    assert parse_parameters("just a prompt\nover two lines") == {
        "prompt": "just a prompt\nover two lines",
        "negative_prompt": "",
        "extra": {},
    }
    assert read_parameters(png_bytes(Image.new("RGB", (8, 8)))) is None
    assert read_parameters(b"not an image") is None
    with_text = Image.new("RGB", (8, 8))
    with_text.info["parameters"] = "a cat\nSteps: 5, Sampler: Euler, Seed: 7"
    assert read_parameters(with_text) == {
        "prompt": "a cat",
        "negative_prompt": "",
        "steps": 5,
        "sampler": "Euler",
        "seed": 7,
        "extra": {},
    }


@pytest.mark.timeout(60)  # the old regex took minutes on these; fail rather than wait
@pytest.mark.parametrize(
    "last_line",
    [
        "w" * 40_000,
        "a " * 20_000,
        "-" * 20_000 + "w" * 20_000,
        "Key: " + '"\\' * 20_000,
        "<lora:" * 7_000,  # LoRA tags are looked for in the prompt lines
        "<lora:" + "a:1" * 13_000,
    ],
)
def test_parameters_parse_in_linear_time(last_line: str) -> None:
    started = time.perf_counter()
    parsed = parse_parameters(f"a prompt\n{last_line}")
    assert time.perf_counter() - started < 0.5
    assert parsed["prompt"].startswith("a prompt")


@pytest.mark.timeout(60)
def test_an_overlong_parameters_chunk_is_not_read() -> None:
    started = time.perf_counter()
    assert read_parameters(freezing_png()) is None
    assert decode_upload(freezing_png(), **LIMITS).size == (64, 64)  # the image itself is fine
    assert time.perf_counter() - started < 1
    longest = "x" * (MAX_PARAMETERS_CHARS - 40) + "\nSteps: 5, Sampler: Euler, Seed: 7"
    parsed = read_parameters(png_bytes(Image.new("RGB", (8, 8)), longest))
    assert parsed is not None and parsed["seed"] == 7
