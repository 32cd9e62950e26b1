"""The owner's allowlist (models.toml) and members' choices of model and LoRAs; fetching
the allowlist from a stand-in Hub, and the doctor's line per model."""

import asyncio
import dataclasses
import io
import json
import math
import random
from pathlib import Path

import pytest
from fakehub import FakeHub, folder_files, point_client_at
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from bot import doctor
from bot.__main__ import download
from bot.db import Store
from bot.db.members import MemberDefaults
from bot.downloads import ModelNotAvailable, fetch_model, source_available
from bot.lora_text import MAX_LORAS, MAX_LORAS_TEXT, parse_loras
from bot.models import Catalog, ModelEntry, ModelsFileError, load_catalog
from bot.requests import DEFAULT_SCHEDULER, InvalidRequest, Limits, RawOptions, validate
from bot.service import ImagineService, require_default_model, saved_defaults
from bot.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

ALLOWLIST = """
default = "sd15"

[models.sd15]
source = "stable-diffusion-v1-5/stable-diffusion-v1-5"
description = "Stable Diffusion 1.5"
negative_prompt = "blurry"

[models.turbo]
source = "stabilityai/sdxl-turbo"
description = "SDXL Turbo: an image in one to four steps"
steps = 2
guidance = 0
max_steps = 4
width = 768
height = 768
scheduler = "Euler a"

[loras.pixel-art]
source = "some-user/pixel-art-lora"
models = ["sd15"]
description = "Pixel art"

[loras.ink]
source = "loras/ink.safetensors"
models = ["sd15", "turbo"]
"""


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Catalog:
    path = tmp_path_factory.mktemp("models") / "models.toml"
    path.write_text(ALLOWLIST)
    return load_catalog(path, "ignored-when-there-is-a-file")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return path


def test_without_a_file_the_one_model_is_model_id(tmp_path):
    catalog = load_catalog(tmp_path / "absent.toml", "tiny")
    assert catalog.default == "tiny"
    assert catalog.entry(None) == ModelEntry("tiny", "tiny")
    assert catalog.loras == {}


def test_the_allowlist_is_read_in_the_file_order(catalog):
    assert catalog.default == "sd15"
    assert list(catalog.models) == ["sd15", "turbo"]
    turbo = catalog.entry("turbo")
    assert (turbo.steps, turbo.guidance, turbo.max_steps, turbo.scheduler) == (2, 0.0, 4, "Euler a")
    assert catalog.loras["ink"].models == ("sd15", "turbo")
    assert [lora.name for lora in catalog.loras_for("sd15")] == ["ink", "pixel-art"]


def test_the_example_file_in_the_repository_loads():
    catalog = load_catalog(ROOT / "models.example.toml", "unused")
    assert catalog.default in catalog.models
    for lora in catalog.loras.values():
        assert set(lora.models) <= set(catalog.models)


def test_every_model_default_is_a_key_of_the_file():
    """ModelEntry's fields and the keys the file may hold are one list; the family alone is
    read from the model's own files at start-up, never from the owner's."""
    from bot.models import _MODEL_KEYS

    assert {f.name for f in dataclasses.fields(ModelEntry)} == {"name", "family", *_MODEL_KEYS}


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ("default = 'a'\n[models.a]\nsource = 'x'\nsteeps = 3\n", "models.a.steeps", "known key"),
        ("default = 'a'\ncolour = 1\n[models.a]\nsource = 'x'\n", "colour", "known key"),
        ("[models.a]\nsource = 'x'\n", "default", "one of a"),
        ("default = 'b'\n[models.a]\nsource = 'x'\n", "default", "one of a"),
        ("default = 'a'\n", "models", "must be a table"),
        ("default = 'a'\n[models]\n", "models", "at least one"),
        ("default = 'a'\n[models.a]\ndescription = 'no source'\n", "models.a.source", "Hub id"),
        ("default = 'a'\n[models.a]\nsource = 'x'\nsteps = 'ten'\n", "models.a.steps", "whole"),
        ("default = 'a'\n[models.a]\nsource = 'x'\nsteps = true\n", "models.a.steps", "whole"),
        ("default = 'a'\n[models.a]\nsource = 'x'\nsteps = 900\n", "models.a.steps", "1 to 150"),
        ("default = 'a'\n[models.a]\nsource = 'x'\nwidth = 500\n", "models.a.width", "multiple"),
        ("default = 'a'\n[models.a]\nsource = 'x'\nscheduler = 'Fast'\n", "scheduler", "one of"),
        (
            "default = 'a'\n[models.a]\nsource = 'x'\nsteps = 8\nmax_steps = 4\n",
            "models.a.steps",
            "max_steps",
        ),
        ("default = 'a'\n[models.a]\nsource = 'x'\ninpaint = 'b'\n", "models.a.inpaint", "one of"),
        ("default = 'a b'\n[models.'a b']\nsource = 'x'\n", "models.a b", "usable name"),
        (
            "default = 'a'\n[models.a]\nsource = 'x'\n[loras.l]\nsource = 'y'\nmodels = ['b']\n",
            "loras.l.models",
            "from: a",
        ),
        (
            "default = 'a'\n[models.a]\nsource = 'x'\n[loras.l]\nsource = 'y'\n",
            "loras.l.models",
            "from: a",
        ),
        (
            "default = 'a'\n[models.a]\nsource = 'x'\n[loras.l]\nmodels = ['a']\nweight = 1\n",
            "loras.l.weight",
            "known key",
        ),
        ("default = 'a'\n[models.a\n", "cannot be read as TOML", ""),
    ],
)
def test_a_malformed_file_stops_start_up_naming_the_key(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ModelsFileError) as refused:
        load_catalog(path, "tiny")
    assert str(path) in str(refused.value)
    assert key in str(refused.value) and fragment in str(refused.value)


PINNED = "fedcba9876543210fedcba9876543210fedcba98"  # a commit of the fake Hub other than main
NOT_ON_HUB = "1" * 40


@pytest.mark.parametrize(
    ("table", "line", "fragment"),
    [
        ("models.a", "revision = 'main'", "got 'main'"),
        ("models.a", "revision = 'v1.0'", "a branch or tag name moves"),
        ("models.a", "revision = '0123abc'", "40 hex digits"),
        ("models.a", f"revision = '{PINNED.upper()}'", "in lowercase"),
        ("models.a", f"revision = '{PINNED}/../x'", "40 hex digits"),
        ("models.a", "revision = 1234", "must be text"),
        ("models.b", f"revision = '{PINNED}'", "'tiny' is not a Hub id"),
        ("loras.l", "revision = 'main'", "40 hex digits"),
        ("loras.l", "revision = ['x']", "40 hex digits"),
    ],
)
def test_a_bad_revision_stops_start_up_with_a_line_naming_it(tmp_path, table, line, fragment):
    tables = {"models.a": "source = 'owner/model'", "models.b": "source = 'tiny'"}
    tables["loras.l"] = "source = 'owner/lora'\nmodels = ['a']"
    text = "default = 'a'\n" + "".join(
        f"[{name}]\n{body}\n{line if name == table else ''}\n" for name, body in tables.items()
    )
    path = write(tmp_path, text)
    with pytest.raises(ModelsFileError) as refused:
        load_catalog(path, "tiny")
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"{path}: `{table}.revision` ")
    assert fragment in message


async def test_a_pinned_revision_is_downloaded_loaded_and_checked_at_that_commit(
    model_cache, tmp_path, monkeypatch, capsys
):
    main = folder_files(model_cache / "tiny-sd")
    scheduler = json.loads(main["scheduler/scheduler_config.json"])
    marked = json.dumps({**scheduler, "beta_end": 0.0125}).encode()
    revisions = {
        "test/tiny-sd": {PINNED: {**main, "scheduler/scheduler_config.json": marked}},
        "test/pixel-lora": {PINNED: {"pixel.safetensors": b"pinned" * 20}},
    }
    repos = {"test/tiny-sd": main, "test/pixel-lora": {"pixel.safetensors": b"main" * 20}}
    pins = f"""
default = "pinned"
[models.pinned]
source = "test/tiny-sd"
revision = "{PINNED}"
[models.latest]
source = "test/tiny-sd"
[loras.pixel]
source = "test/pixel-lora"
revision = "{PINNED}"
models = ["pinned"]
"""
    cache = tmp_path / "cache"
    settings = Settings(
        discord_token="", device="cpu", model_cache=cache, models_file=write(tmp_path, pins)
    )
    async with FakeHub(repos, revisions=revisions) as hub:
        point_client_at(hub, monkeypatch)
        assert await asyncio.to_thread(download, settings, None) == 0, capsys.readouterr()
        with pytest.raises(ModelNotAvailable) as gone:
            await asyncio.to_thread(fetch_model, "test/tiny-sd", cache, revision=NOT_ON_HUB)
    assert f"'test/tiny-sd' at {NOT_ON_HUB} could not be downloaded" in str(gone.value)
    lora_gets = [r.path for r in hub.requests if r.method == "GET" and "pixel-lora/res" in r.path]
    assert lora_gets == [f"/test/pixel-lora/resolve/{PINNED}/pixel.safetensors"]

    from bot.pipelines import PipelineOptions, PipelineRunner
    from bot.pipelines.loading import lora_file

    catalog = load_catalog(settings.models_file, "unused")
    runner = PipelineRunner(PipelineOptions(device="cpu", cache_dir=cache), catalog)
    assert runner.load("pinned").scheduler.config.beta_end == 0.0125  # the pinned commit's
    assert runner.load("latest").scheduler.config.beta_end == scheduler["beta_end"]  # main's
    pinned_lora = lora_file("test/pixel-lora", PipelineOptions(cache_dir=cache, revision=PINNED))
    assert pinned_lora.read_bytes() == b"pinned" * 20
    assert not source_available("lora", "test/pixel-lora", cache)  # main was never fetched

    out = io.StringIO()
    doctor.check_models(settings, doctor.Report(out))
    lines = {line.split(":", 1)[0]: line for line in out.getvalue().splitlines()}
    assert f"test/tiny-sd at {PINNED} loads on cpu" in lines["✓ model pinned"]
    assert f"test/pixel-lora at {PINNED} is here" in lines["✓ LoRA pixel"]
    settings.models_file.write_text(pins.replace(PINNED, NOT_ON_HUB, 1))
    out = io.StringIO()
    doctor.check_models(settings, doctor.Report(out))
    lines = {line.split(":", 1)[0]: line for line in out.getvalue().splitlines()}
    assert f"test/tiny-sd at {NOT_ON_HUB} is not in" in lines["✗ model pinned"]
    assert "test/tiny-sd is here" in lines["✓ model latest"]


def test_members_choose_only_from_the_allowlist(catalog):
    assert catalog.entry(None).name == "sd15"
    assert catalog.entry(" turbo ").name == "turbo"
    for hostile in ("sdxl", "x" * 10_000, 3, ["sd15"]):
        with pytest.raises(InvalidRequest) as refused:
            catalog.entry(hostile)
        assert refused.value.option == "model"
        assert "sd15, turbo" in str(refused.value)
        assert len(str(refused.value)) < 300


def test_a_missing_model_or_lora_is_refused_until_fetched(catalog):
    missing = dataclasses.replace(
        catalog, missing={"stabilityai/sdxl-turbo", "loras/ink.safetensors"}
    )
    with pytest.raises(
        InvalidRequest, match=r"turbo is not installed.*python -m bot download.*sd15"
    ):
        missing.entry("turbo")
    with pytest.raises(
        InvalidRequest, match="'ink' is not installed yet; for sd15 choose from: pixel-art"
    ):
        missing.check_loras("sd15", "ink")
    assert [m.name for m in missing.usable_models()] == ["sd15"]


def test_a_model_that_only_fills_zoom_and_pan_is_not_offered_to_members():
    catalog = Catalog(
        "tiny",
        {
            "tiny": ModelEntry("tiny", "tiny", inpaint="tiny-inpaint"),
            "tiny-inpaint": ModelEntry("tiny-inpaint", "tiny-inpaint"),
        },
    )
    assert [m.name for m in catalog.usable_models()] == ["tiny"]
    with pytest.raises(InvalidRequest, match=r"only paints the new area.*choose one of: tiny"):
        catalog.entry("tiny-inpaint")
    assert catalog.entry("tiny").inpaint == "tiny-inpaint"


def test_with_ray_workers_a_missing_default_model_still_stops_start_up(catalog):
    """EXECUTOR=ray: the bot's own runner loads nothing, yet a missing default model fails
    start-up with the command that fetches it, as the local executor's load does."""
    require_default_model(catalog)  # everything here
    with pytest.raises(ModelNotAvailable, match=r"stable-diffusion.*python -m bot download"):
        default_source = catalog.models[catalog.default].source
        require_default_model(dataclasses.replace(catalog, missing={default_source}))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ()),
        ("pixel-art", (("pixel-art", 1.0),)),
        ("pixel-art:0.8 ink:-1.5", (("ink", -1.5), ("pixel-art", 0.8))),
        ("ink:0.333, pixel-art:2", (("ink", 0.33), ("pixel-art", 2.0))),
        ("  ink:0  ", (("ink", 0.0),)),
    ],
)
def test_lora_text_is_name_and_weight_sorted_by_name(text, expected):
    assert parse_loras(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("ink:3", "from -2 to 2, got 3.0"),
        ("ink:-2.01", "from -2 to 2"),
        ("ink:nan", "from -2 to 2"),
        ("ink:inf", "from -2 to 2"),
        ("ink:heavy", "from -2 to 2"),
        ("ink:1 ink:0.5", "named twice"),
        (" ".join(f"l{i}" for i in range(MAX_LORAS + 1)), f"at most {MAX_LORAS}"),
        ("a" * (MAX_LORAS_TEXT + 1), f"at most {MAX_LORAS_TEXT} are allowed"),
        ("<lora:ink:1>", "not `name` or `name:weight`"),
        ("x" * 65, "not `name`"),
    ],
)
def test_bad_lora_text_is_refused_naming_what_is_allowed(text, fragment):
    with pytest.raises(InvalidRequest) as refused:
        parse_loras(text)
    assert refused.value.option == "lora"
    assert fragment in str(refused.value)
    assert len(str(refused.value)) < 300


def test_loras_must_fit_the_model(catalog):
    assert catalog.check_loras("sd15", "pixel-art:0.5 ink") == (("ink", 1.0), ("pixel-art", 0.5))
    assert catalog.check_loras("turbo", [("ink", 1)]) == (("ink", 1.0),)
    with pytest.raises(
        InvalidRequest, match="'pixel-art' does not fit turbo; for turbo choose from: ink"
    ):
        catalog.check_loras("turbo", "pixel-art")
    with pytest.raises(
        InvalidRequest,
        match="'cats' is not a LoRA on this server; for sd15 choose from: ink, pixel-art",
    ):
        catalog.check_loras("sd15", "cats")
    with pytest.raises(InvalidRequest, match="tiny takes no LoRAs"):
        Catalog.single("tiny").check_loras("tiny", "ink")
    for hostile in ([("ink", math.inf)], [("ink", True)], [("ink",)], "ink:1e308", 7):
        with pytest.raises(InvalidRequest):
            catalog.check_loras("sd15", hostile)


def test_a_model_brings_its_defaults_within_the_server_bounds(catalog):
    base = Limits(max_steps=50, min_side=256, max_side=640)
    assert catalog.limits_for("sd15", base) == base
    turbo = catalog.limits_for("turbo", base)
    assert (turbo.max_steps, turbo.default_steps, turbo.default_guidance) == (4, 2, 0.0)
    assert (turbo.default_width, turbo.default_height) == (640, 640)  # clamped to MAX_SIZE
    assert turbo.default_scheduler == "Euler a"


def test_validation_takes_the_model_defaults_negative_prompt_and_loras(catalog):
    limits = Limits()
    rng = random.Random(1)

    def check(**options):
        return validate(RawOptions("a panda", **options), limits, catalog, rng)

    plain = check()
    assert (plain.model, plain.scheduler, plain.negative_prompt, plain.loras) == (
        "sd15",
        DEFAULT_SCHEDULER,
        "blurry",
        (),
    )
    assert check(negative_prompt="text").negative_prompt == "blurry, text"
    # A variation carries its parent's negative prompt, prefix included: not twice.
    assert check(negative_prompt="blurry, text").negative_prompt == "blurry, text"
    assert check(negative_prompt="blurryish").negative_prompt == "blurry, blurryish"
    turbo = check(model="turbo", loras="ink:0.5")
    assert (turbo.model, turbo.steps, turbo.guidance, turbo.width) == ("turbo", 2, 0.0, 768)
    assert turbo.negative_prompt == ""
    assert turbo.loras == turbo.batch_key.loras == (("ink", 0.5),)
    assert turbo.batch_key != check(model="turbo").batch_key
    with pytest.raises(InvalidRequest, match="from 1 to 4"):
        check(model="turbo", steps=5)
    with pytest.raises(InvalidRequest) as refused:
        check(model="nope")
    assert refused.value.option == "model"


FETCHED = """
default = "tiny"
[models.tiny]
source = "tiny"
[models.hub-sd]
source = "test/tiny-sd"
[models.pickled]
source = "test/pickled"
[loras.pixel]
source = "test/pixel-lora"
models = ["tiny", "hub-sd"]
[loras.bare]
source = "test/no-safetensors"
models = ["tiny"]
"""


async def test_download_fetches_the_allowlist_as_safetensors_only(
    model_cache, tmp_path, monkeypatch, capsys
):
    model = folder_files(model_cache / "tiny-sd")
    pickled = {path.replace(".safetensors", ".bin"): data for path, data in model.items()}
    lora = {"pixel.safetensors": b"s" * 100, "pixel.bin": b"p" * 100, "README.md": b"# pixel"}
    repos = {
        "test/tiny-sd": model,
        "test/pickled": pickled,
        "test/pixel-lora": lora,
        "test/no-safetensors": {"README.md": b"# nothing"},
    }
    settings = Settings(
        discord_token="", model_cache=tmp_path / "cache", models_file=write(tmp_path, FETCHED)
    )
    async with FakeHub(repos) as hub:
        point_client_at(hub, monkeypatch)
        assert await asyncio.to_thread(download, settings, None) == 1
    out, err = capsys.readouterr()
    assert "tiny is built in or on disk: nothing to download" in out
    assert "test/pickled has weights only in a pickle format" in err
    assert "'test/no-safetensors' holds no .safetensors file" in err
    assert "pixel.safetensors" in hub.downloads() and "pixel.bin" not in hub.downloads()
    assert not any(path.endswith(".bin") for path in hub.downloads())
    cache = settings.model_cache
    assert source_available("model", "test/tiny-sd", cache)
    assert source_available("lora", "test/pixel-lora", cache)
    assert not source_available("model", "test/pickled", cache)
    assert not source_available("lora", "test/no-safetensors", cache)


def test_the_doctor_has_a_line_per_allowlisted_model_and_lora(model_cache, tmp_path):
    settings = Settings(
        discord_token="",
        device="cpu",
        model_cache=model_cache,
        models_file=write(tmp_path, FETCHED),
    )
    out = io.StringIO()
    report = doctor.Report(out)
    doctor.check_models(settings, report)
    lines = {line.split(":", 1)[0]: line for line in out.getvalue().splitlines()}
    assert report.failed
    assert "loads on cpu" in lines["✓ model tiny"]
    assert "test/tiny-sd is not in" in lines["✗ model hub-sd"]
    assert "python -m bot download" in lines["✗ model hub-sd"]
    assert set(lines) == {
        "✓ model tiny",
        "✗ model hub-sd",
        "✗ model pickled",
        "✗ LoRA pixel",
        "✗ LoRA bare",
    }


async def test_start_up_names_what_is_missing_and_members_are_refused_it(
    settings, tiny_runner, caplog
):
    settings.models_file.write_text(
        'default = "tiny"\n[models.tiny]\nsource = "tiny"\n'
        '[models.big]\nsource = "test/not-fetched"\n'
        '[loras.ink]\nsource = "test/ink-lora"\nmodels = ["tiny"]\n'
    )
    service = ImagineService(settings, await Store.open(settings.database_path), tiny_runner)
    try:
        await service.load_model()  # never downloads: there is no Hub to ask here
    finally:
        await service.close()
    logged = caplog.text
    assert "model test/not-fetched is not in" in logged and "python -m bot download" in logged
    assert "lora test/ink-lora is not in" in logged
    assert service.validate(RawOptions("a fox")).model == "tiny"
    with pytest.raises(InvalidRequest, match=r"big is not installed yet.*choose one of: tiny"):
        service.validate(RawOptions("a fox", model="big"))
    with pytest.raises(InvalidRequest, match="'ink' is not installed yet"):
        service.validate(RawOptions("a fox", loras="ink:0.5"))


def test_a_models_own_defaults_beat_a_members_saved_ones(catalog):
    """A member who saved 30 steps and 512 pixels in /settings still gets a Turbo model's
    2 steps and 768 pixels, rather than a refusal for steps they never typed."""
    saved = MemberDefaults(steps=30, width=512, scheduler="DDIM", negative_prompt="text", count=2)
    turbo = saved_defaults(RawOptions("a fox", model="turbo"), saved, catalog)
    assert (turbo.steps, turbo.width, turbo.scheduler) == (None, None, None)
    assert (turbo.negative_prompt, turbo.count) == ("text", 2)
    request = validate(turbo, Limits(), catalog)
    assert (request.steps, request.width, request.scheduler) == (2, 768, "Euler a")
    assert saved_defaults(RawOptions("a fox"), saved, catalog).steps == 30
    assert catalog.own_defaults(["turbo"]) == catalog.own_defaults("nope") == frozenset()


LORA_WORDS = st.sampled_from(["ink", "pixel-art", "cats", ":", ",", " ", "0.5", "-2", "1e9", "<"])


@hypothesis_settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.none(),
        st.integers(),
        st.text(max_size=400),
        st.lists(LORA_WORDS, max_size=40).map("".join),
        st.lists(st.tuples(st.sampled_from(["ink", "pixel-art", "x"]), st.floats()), max_size=7),
    )
)
def test_any_lora_value_is_checked_or_refused_in_a_line(catalog, value):
    try:
        loras = catalog.check_loras("sd15", value)
    except InvalidRequest as refused:
        assert refused.option == "lora" and "\n" not in str(refused) and len(str(refused)) < 300
    else:
        assert list(loras) == sorted(loras) and len(loras) <= MAX_LORAS
        assert all(name in ("ink", "pixel-art") and -2 <= w <= 2 for name, w in loras)
