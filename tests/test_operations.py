"""Upscale, Zoom Out and Pan as geometry and pixels (bot/operations.py), and mode "inpaint" in the
runner on the tiny models: the kept pixels come back exactly, a seed gives the same pixels
alone or batched, and large results go through the tiled VAE."""

from dataclasses import replace

import numpy as np
import pytest
from factories import make_request
from test_images import encode, noise

from bot import operations
from bot.images import ImageRejected, decode_upload
from bot.models import Catalog, LoraEntry, ModelEntry
from bot.requests import BatchKey, ImageSpec

RULES = {"max_side": 1024, "pan_step": 256}


@pytest.mark.parametrize(
    ("operation", "size", "box"),
    [
        ("upscale-subtle", (512, 384), None),
        ("upscale-creative", (512, 384), None),
        ("zoom-1.5", (384, 288), (64, 48, 320, 240)),
        ("zoom-2", (512, 384), (128, 96, 384, 288)),
        ("pan-left", (512, 192), (256, 0, 512, 192)),
        ("pan-right", (512, 192), (0, 0, 256, 192)),
        ("pan-up", (256, 448), (0, 256, 256, 448)),
        ("pan-down", (256, 448), (0, 0, 256, 192)),
    ],
)
def test_each_operation_makes_its_size_and_keeps_the_parent_where_it_was(operation, size, box):
    chosen = operations.plan(operation, 256, 192, **RULES)
    assert (chosen.width, chosen.height) == size and chosen.keep_box == box
    assert chosen.mode == ("image" if box is None else "inpaint")


@pytest.mark.parametrize("side", [200, 264, 328, 1000])
def test_zoom_sizes_are_multiples_of_8_with_the_parent_centred(side):
    for operation in ("zoom-1.5", "zoom-2"):
        try:
            chosen = operations.plan(operation, side, 64, max_side=2048, pan_step=256)
        except operations.OperationRefused:
            assert side * operations.ZOOMS[operation] > 2048
            continue
        assert chosen.width % 8 == 0 and chosen.height % 8 == 0
        left, top, right, bottom = chosen.keep_box
        assert (right - left, bottom - top) == (side, 64)
        assert abs(left - (chosen.width - right)) <= 1 and abs(top - (chosen.height - bottom)) <= 1


def test_an_operation_past_max_size_is_refused_not_capped():
    with pytest.raises(operations.OperationRefused, match="1024 pixels a side"):
        operations.plan("upscale-subtle", 768, 512, **RULES)
    assert operations.available(768, 512, **RULES) == [
        "pan-left",
        "pan-right",
        "pan-up",
        "pan-down",
    ]
    assert operations.available(512, 512, **RULES) == list(operations.OPERATIONS)
    assert operations.available(1024, 1024, **RULES) == []
    assert "zoom-2" not in operations.available(640, 320, **RULES)


def test_masks_feather_only_the_seams_that_meet_new_area():
    chosen = operations.plan("pan-right", 64, 64, max_side=1024, pan_step=64)
    size = (chosen.width, chosen.height)
    repaint = np.asarray(operations.repaint_mask(size, chosen.keep_box))
    blend = np.asarray(operations.blend_mask(size, chosen.keep_box))
    # The parent sits on the left; only its right side meets the new strip.
    assert (repaint[:, 64:] == 255).all() and (repaint[:, 64 - 16 : 64] == 255).all()
    assert (repaint[:, : 64 - 16] == 0).all()
    assert (blend[:, :48] == 0).all() and (blend[:, 64:] == 255).all()
    ramp = blend[10, 48:64]
    assert (np.diff(ramp.astype(int)) > 0).all()  # fading towards the seam


def test_zoom_masks_feather_all_four_sides():
    chosen = operations.plan("zoom-2", 64, 64, **RULES)
    repaint = np.asarray(operations.repaint_mask((128, 128), chosen.keep_box))
    assert (repaint[32 + 16 : 96 - 16, 32 + 16 : 96 - 16] == 0).all()
    assert repaint.sum() // 255 == 128 * 128 - 32 * 32


def test_paste_back_keeps_the_parent_exactly_past_the_feather():
    parent = noise(64, 64, seed=1)
    chosen = operations.plan("zoom-2", 64, 64, **RULES)
    start = operations.init_image(parent, chosen)
    painted = noise(128, 128, seed=2)
    result = np.asarray(operations.paste_back(painted, start, chosen.keep_box)).astype(int)
    inner = result[32 + 16 : 96 - 16, 32 + 16 : 96 - 16]
    assert (inner == np.asarray(parent)[16:-16, 16:-16]).all()
    assert (result[:32] == np.asarray(painted)[:32]).all()
    band = result[32 + 4, 40:88]  # inside the feather: between the two
    assert not (band == np.asarray(painted)[36, 40:88]).all()
    assert not (band == np.asarray(parent)[4, 8:56]).all()


def test_the_new_area_starts_from_the_parents_edges_not_black():
    parent = noise(64, 64, seed=3).point(lambda v: 100 + v // 4)  # a mid-grey picture
    start = np.asarray(operations.init_image(parent, operations.plan("zoom-2", 64, 64, **RULES)))
    assert start[:32].mean() > 90 and start[:, :32].min() > 50
    upscaled = operations.init_image(parent, operations.plan("upscale-subtle", 64, 64, **RULES))
    assert upscaled.size == (128, 128)


def test_the_start_picture_is_decoded_as_safely_as_an_upload():
    chosen = operations.plan("upscale-subtle", 64, 64, **RULES)
    limits = {"max_bytes": 10**6, "max_pixels": 10**6}
    png = operations.start_picture(encode(noise(96, 96), "PNG"), (64, 64), chosen, **limits)
    assert decode_upload(png, **limits).size == (128, 128)  # brought back to 64² first
    with pytest.raises(ImageRejected):
        operations.start_picture(b"not an image" * 10, (64, 64), chosen, **limits)


def catalog_with_inpaint():
    return Catalog(
        "base",
        {
            "base": ModelEntry("base", "tiny", inpaint="painter"),
            "painter": ModelEntry("painter", "tiny-inpaint"),
            "plain": ModelEntry("plain", "tiny"),
        },
        {
            "both": LoraEntry("both", "tiny-lora", ("base", "painter", "plain")),
            "base-only": LoraEntry("base-only", "tiny-lora", ("base",)),
        },
    )


def test_an_operation_request_keeps_the_parent_and_costs_what_it_denoises():
    checked = make_request(
        width=512,
        height=512,
        steps=20,
        mode="image",
        strength=0.3,
        init_image_hash="h",
        model="base",
        loras=(("base-only", 0.5), ("both", 1.0)),
    )
    catalog = catalog_with_inpaint()
    upscale = operations.plan("upscale-subtle", 256, 256, **RULES)
    made = operations.operation_request(checked, upscale, catalog)
    assert (made.mode, made.strength, made.operation, made.model) == (
        "image",
        0.3,
        "upscale-subtle",
        "base",
    )
    assert made.cost == 6 * 512 * 512 / (512 * 512 * 25)  # int(20 × 0.3) steps denoised
    zoom = operations.plan("zoom-2", 256, 256, **RULES)
    painted = operations.operation_request(replace(checked, strength=1.0), zoom, catalog)
    assert (painted.mode, painted.strength, painted.keep_box) == ("inpaint", None, zoom.keep_box)
    assert painted.model == "painter" and painted.loras == (("both", 1.0),)
    assert painted.cost == 20 * 512 * 512 / (512 * 512 * 25)  # every step, the whole canvas
    assert painted.batch_key.mode == "inpaint" and painted.batch_key.image_steps is None
    own = operations.operation_request(replace(checked, model="plain"), zoom, catalog)
    assert own.model == "plain" and own.loras == checked.loras  # inpainting mode of itself
    assert operations.drawing_model(painted, catalog) == "base"  # what a Vary of it draws with
    assert operations.drawing_model(own, catalog) == "plain"
    assert operations.drawing_model(made, catalog) == "base"


# ---- the runner ---------------------------------------------------------------------------


@pytest.fixture
def runner(tiny_runner):
    return tiny_runner


def zoom_specs(parent, seeds, guidance=7.5):
    chosen = operations.plan("zoom-2", *parent.size, **RULES)
    start = operations.init_image(parent, chosen)
    key = BatchKey("", "inpaint", chosen.width, chosen.height, 3, "Euler a", cfg=True)
    specs = [
        ImageSpec("a lake", "", seed, guidance, init_image=start, keep_box=chosen.keep_box)
        for seed in seeds
    ]
    return key, specs


@pytest.mark.parametrize("model", ["tiny-inpaint", "tiny", "tiny-sdxl"])
def test_inpaint_keeps_the_centre_and_a_seed_gives_the_same_pixels_batched(runner, model):
    parent = noise(64, 64, seed=4)
    key, specs = zoom_specs(parent, [7, 8, 9])
    key = replace(key, model=model)
    specs[1] = replace(specs[1], guidance=3.0, prompt="a boat")
    batched = runner.generate(key, specs)
    alone = runner.generate(key, [specs[1]])
    assert batched[1].image.size == (128, 128)
    a, b = np.asarray(batched[1].image).astype(int), np.asarray(alone[0].image).astype(int)
    assert np.abs(a - b).max() <= 1
    centre = a[32 + 16 : 96 - 16, 32 + 16 : 96 - 16]
    assert (centre == np.asarray(parent)[16:-16, 16:-16]).all()
    assert np.abs(a[:32].astype(int) - np.asarray(specs[1].init_image)[:32]).mean() > 1


def test_results_over_the_tiling_threshold_decode_in_tiles(runner, monkeypatch):
    key, specs = zoom_specs(noise(64, 64, seed=5), [3])
    key = replace(key, model="tiny-inpaint")
    whole = runner.generate(key, specs)[0].image
    pipe = runner.load("tiny-inpaint")
    seen = []
    decode = type(pipe.vae).tiled_decode
    monkeypatch.setattr(
        type(pipe.vae), "tiled_decode", lambda vae, *a, **k: seen.append(1) or decode(vae, *a, **k)
    )
    monkeypatch.setattr(runner.options, "vae_tiling_pixels", 64 * 64)
    tiled = runner.generate(key, specs)[0].image
    assert seen and tiled.size == whole.size
    monkeypatch.undo()
    runner.generate(key, specs)
    assert not pipe.vae.use_tiling  # set per call, so the next small call decodes whole
