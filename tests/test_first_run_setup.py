"""The first-run pieces in this process: the model download (disk check, progress, resuming
an interrupted file) against a stand-in for the Hub, registering the commands only when the
tree changed, and the doctor passing on a bot that is set up."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from dataclasses import replace
from pathlib import Path

import discord
import pytest
from fakehub import COMMIT, FakeHub, folder_files, point_client_at
from harness.in_process import running_bot

from bot import doctor
from bot.__main__ import make_bot, offline_bot, open_service
from bot.discord_setup import register_commands
from bot.downloads import (
    PARTIAL,
    ModelNotAvailable,
    NotEnoughDisk,
    cached_model,
    fetch_model,
    needed_files,
)

REPO = "imagine-test/tiny-sd"
BIG = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def repo_files(model_cache: Path) -> dict[str, bytes]:
    """The tiny model as `save_pretrained` wrote it, plus a half-precision variant."""
    extra = {"unet/diffusion_pytorch_model.fp16.safetensors": b"h" * 9}
    return {**folder_files(model_cache / "tiny-sd"), **extra}


@pytest.fixture
async def hub(repo_files, monkeypatch):
    """The stand-in Hub, with this process's Hub client pointed at it and allowed online."""
    async with FakeHub({REPO: repo_files}) as hub:
        point_client_at(hub, monkeypatch)
        yield hub


def test_needed_files_take_one_full_precision_set_of_weights_per_component():
    index = {"_class_name": "X", "unet": ["diffusers", "U"], "safety_checker": [None, None]}
    paths = [
        "model_index.json",
        "v1-5-pruned.safetensors",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "unet/diffusion_pytorch_model.bin",
        "safety_checker/model.safetensors",
        "text_encoder/model.safetensors",
    ]
    assert needed_files(paths, index) == [
        "model_index.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    sharded = ["unet/config.json", "unet/m-00001-of-00002.bin", "unet/m-00002-of-00002.bin"]
    sharded += ["unet/m.bin.index.json", "unet/m.fp16-00001-of-00001.bin"]
    assert needed_files(sharded, index) == ["model_index.json", *sharded[:4]]


async def test_a_download_that_does_not_fit_is_refused_with_one_line_before_any_weights(
    hub, repo_files, tmp_path
):
    with pytest.raises(NotEnoughDisk) as refused:
        await asyncio.to_thread(fetch_model, REPO, tmp_path, free_bytes=lambda _: 1_000_000)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"Not enough disk space to download {REPO}: it needs 4.4 MB")
    assert "1.0 MB is free" in message and "MODEL_CACHE" in message
    assert hub.downloads() == ["model_index.json"]  # read to know what is needed; nothing else
    assert cached_model(REPO, tmp_path) is None


async def test_an_interrupted_download_keeps_its_finished_files_and_resumes_with_progress(
    hub, repo_files, tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="bot.downloads")
    hub.failing[BIG] = 500  # this run stops at the largest file
    with pytest.raises(ModelNotAvailable) as stopped:
        await asyncio.to_thread(fetch_model, REPO, tmp_path, every=0.1)
    assert "\n" not in str(stopped.value) and "Start again to resume" in str(stopped.value)
    finished = set(hub.downloads()) - {BIG}  # those not yet started when it stopped are not
    assert "unet/config.json" in finished and cached_model(REPO, tmp_path) is None
    kept = len(finished - {"model_index.json"})

    del hub.failing[BIG]
    hub.requests.clear()
    caplog.clear()
    hub.cut_once(BIG, 300_000)  # and the next one loses its connection in the middle of it
    hub.chunk_delay = 0.02  # about a second for the file: several progress lines
    folder = await asyncio.to_thread(fetch_model, REPO, tmp_path, every=0.1)

    assert folder == cached_model(REPO, tmp_path)
    assert (folder / BIG).read_bytes() == repo_files[BIG]
    fetched = hub.downloads()
    assert fetched.count(BIG) == 2 and not finished & set(fetched)  # nothing fetched again
    ranges = [r.range for r in hub.requests if r.method == "GET" and r.path.endswith(BIG)]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"
    lines = [r.getMessage() for r in caplog.records if r.name == "bot.downloads"]
    assert lines[0].endswith(f" ({kept} already here from an earlier download)")
    progress = [line for line in lines if line.startswith(f"downloading {REPO}: ")]
    assert len(progress) >= 3, lines
    assert all(" MB (" in line and "%), " in line and "/s, " in line for line in progress)
    assert any(line.endswith(" s left") for line in progress)
    assert lines[-1].startswith(f"downloaded {REPO}: ")


async def test_a_download_stopped_mid_file_resumes_from_its_partial_file_after_a_restart(
    hub, repo_files, tmp_path
):
    hub.cut_once(BIG, 300_000, then=503)  # the connection drops and the run ends mid-file,
    with pytest.raises(ModelNotAvailable):  # as when the process is killed there
        await asyncio.to_thread(fetch_model, REPO, tmp_path)
    blobs = tmp_path / "models--imagine-test--tiny-sd" / "blobs"
    [partial] = blobs.glob(f"*{PARTIAL}")
    kept = partial.stat().st_size
    assert 0 < kept < len(repo_files[BIG])
    assert partial.read_bytes() == repo_files[BIG][:kept]

    del hub.failing[BIG]
    hub.requests.clear()
    folder = await asyncio.to_thread(fetch_model, REPO, tmp_path)  # a new call, as on restart

    ranges = [r.range for r in hub.requests if r.method == "GET" and r.path.endswith(BIG)]
    assert ranges == [f"bytes={kept}-"]  # only the rest of the file was asked for
    assert folder == cached_model(REPO, tmp_path)
    needed = needed_files(repo_files, json.loads(repo_files["model_index.json"]))
    assert folder_files(folder) == {path: repo_files[path] for path in needed}
    assert (folder / BIG).resolve().parent == blobs.resolve()  # linked as the Hub client does
    assert list(blobs.glob(f"*{PARTIAL}")) == []


@pytest.mark.parametrize(
    "etag", ["../../escaped", "../../../escaped", "{outside}/escaped", "not-hex", "A" * 40]
)
@pytest.mark.parametrize("path", ["model_index.json", BIG])
async def test_a_crafted_etag_is_refused_naming_the_file_and_nothing_is_written_outside_the_cache(
    hub, tmp_path, etag, path
):
    """A Hub blob is named by a git sha1 or a sha256; an ETag of any other form (a relative or
    absolute path, or not hex) never becomes a file name."""
    cache, outside = tmp_path / "cache", tmp_path / "outside"
    outside.mkdir()
    hub.etags[path] = f'"{etag.format(outside=outside)}"'
    with pytest.raises(ModelNotAvailable) as refused:
        await asyncio.to_thread(fetch_model, REPO, cache)
    message = str(refused.value)
    assert "\n" not in message and f"was refused: the Hub's ETag for {path} is " in message
    assert "nothing was written" in message
    written = [p for p in tmp_path.rglob("*") if not p.is_dir()]
    assert all(cache in p.parents for p in written), written
    assert not any("escaped" in p.name or p.name.startswith("AAAA") for p in written)
    assert path not in hub.downloads()  # its bytes were never asked for


async def test_a_crafted_commit_or_file_path_from_the_hub_never_becomes_a_folder(
    hub, repo_files, tmp_path
):
    cache = tmp_path / "cache"
    hub.main_commit = "../../../escaped"
    with pytest.raises(ModelNotAvailable) as refused:
        await asyncio.to_thread(fetch_model, REPO, cache)
    assert f"the commit the Hub gave for {REPO} is '../../../escaped'" in str(refused.value)
    hub.main_commit = COMMIT
    index = {**json.loads(repo_files["model_index.json"]), "..": ["diffusers", "Escape"]}
    crafted = {"../escaped": b"x", "model_index.json": json.dumps(index).encode()}
    hub.repos[REPO] = {**repo_files, **crafted}
    with pytest.raises(ModelNotAvailable) as refused:
        await asyncio.to_thread(fetch_model, REPO, cache)
    assert "the Hub listed a file '../escaped', which is not a path inside" in str(refused.value)
    assert not any("escaped" in p.name for p in tmp_path.rglob("*"))


async def test_a_model_the_hub_does_not_have_fails_with_one_line(hub, tmp_path):
    with pytest.raises(ModelNotAvailable) as missing:
        await asyncio.to_thread(fetch_model, "nobody/nothing", tmp_path)
    assert "\n" not in str(missing.value) and "'nobody/nothing' could not be downloaded" in str(
        missing.value
    )


async def test_commands_are_registered_only_when_the_tree_or_its_target_changes(
    discord_world, settings
):
    fake = discord_world.fake
    guild = discord_world.guild
    service = await open_service(replace(settings, discord_api_base=fake.api_base))
    saved = discord.http.Route.BASE
    try:
        async with make_bot(service.settings, service) as bot:
            await bot.login(fake.token)
            assert await register_commands(bot.tree, bot.store, guild.id) is not None
            assert await register_commands(bot.tree, bot.store, guild.id) is None
            assert [r.path for r in fake.command_syncs] == [
                f"/applications/{fake.bot_user_id}/guilds/{guild.id}/commands"
            ]
            assert {c["name"] for c in fake.registered_commands(guild)} >= {"imagine", "Vary"}
            await register_commands(bot.tree, bot.store, None)  # another target: registered
            await register_commands(bot.tree, bot.store, guild.id, force=True)  # `sync`
            assert len(fake.command_syncs) == 3
            bot.tree.remove_command("imagine")  # the tree changed: registered again
            assert await register_commands(bot.tree, bot.store, None) is not None
            assert "imagine" not in {c["name"] for c in fake.registered_commands()}
    finally:
        await service.store.close()
        discord.http.Route.BASE = saved


async def test_the_doctor_passes_once_the_bot_has_started(discord_world, settings, tiny_runner):
    fake = discord_world.fake
    async with running_bot(fake, settings, runner=tiny_runner):
        assert len(fake.command_syncs) == 1  # the start registered the commands
    out = io.StringIO()
    settings = replace(settings, discord_token=fake.token, discord_api_base=fake.api_base)
    saved = discord.http.Route.BASE
    try:
        code = await doctor.run(settings, lambda: offline_bot(settings), doctor.Report(out))
    finally:
        discord.http.Route.BASE = saved
    lines = out.getvalue().splitlines()
    assert code == 0, lines
    names = [line.split(":", 1)[0] for line in lines]
    assert names[:3] == ["✓ database", "✓ token", "✓ intents"]
    assert {"✓ permissions in Test Server", "✓ commands", "✓ model", "✓ device"} <= set(names)
    assert all(line.startswith("✓ ") for line in lines)
