"""First run in two commands: `python -m bot` fetches a missing model (from a stand-in for the
Hub), registers the slash commands only when they changed, and logs the invite link;
`python -m bot invite` prints it; `python -m bot doctor` checks the set-up line by line.

Child processes import torch (seconds each), so each one here proves several things."""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from fakediscord import FakeDiscord
from fakediscord.models import Perm
from fakehub import FakeHub, folder_files
from harness.answers import attachment_names
from harness.child_process import BotProcess, run_bot_command

from bot.discord_setup import PERMISSIONS

REPO = "imagine-test/tiny-sd"
# Files a real SD repo also holds and the bot must not fetch: a half-precision variant, the
# pickled weights beside the safetensors, and the single-file checkpoint at the root.
UNNEEDED = {
    "unet/diffusion_pytorch_model.fp16.safetensors": b"h" * 5000,
    "text_encoder/pytorch_model.bin": b"p" * 5000,
    "v1-5-pruned.ckpt": b"c" * 5000,
}


@pytest.fixture(scope="module")
def repo_files(model_cache: Path) -> dict[str, bytes]:
    """The tiny model as `save_pretrained` wrote it, plus what a real repo carries besides."""
    return {**folder_files(model_cache / "tiny-sd"), **UNNEEDED}


def needed(repo_files: dict[str, bytes]) -> set[str]:
    return set(repo_files) - set(UNNEEDED)


def hub_environment(hub: FakeHub, workdir: Path) -> dict[str, str]:
    return {
        "MODEL_ID": REPO,
        "HF_HUB_OFFLINE": "0",
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(workdir / "hf-home"),
    }


async def wait_connected(fake: FakeDiscord, process: BotProcess, identifies: int) -> None:
    """Until the process has identified `identifies` times in all and is READY."""
    await fake.wait_until(lambda: len(fake.identifies) >= identifies or None, 90, "IDENTIFY")
    await process.wait_ready(fake)


async def test_first_start_fetches_the_model_and_registers_the_commands_a_restart_does_neither(
    fake_discord, repo_files, tmp_path
):
    fake = fake_discord
    guild = fake.add_guild("Test Server")
    alice = fake.add_member(guild, "alice")
    cache, workdir = tmp_path / "models", tmp_path / "bot"
    async with FakeHub({REPO: repo_files}) as hub:
        env = hub_environment(hub, workdir)
        first = BotProcess.start(fake, cache, workdir, **env)
        try:
            await wait_connected(fake, first, 1)
            log = first.log()
            missing = len(needed(repo_files)) - 1  # model_index.json tells what the rest is
            assert f"downloading {REPO} into {cache}: {missing} files" in log
            progress = [line for line in first.log_lines() if f"downloaded {REPO}:" in line]
            assert len(progress) == 1 and " MB in " in progress[0] and "/s)" in progress[0]
            assert set(hub.downloads()) == needed(repo_files)  # no variant, .bin or checkpoint

            [sync] = fake.command_syncs
            assert sync.path == f"/applications/{fake.bot_user_id}/commands"
            assert "imagine" in {c["name"] for c in fake.registered_commands()}
            invite = await first.wait_log("invite link: https://discord.com/oauth2/authorize?")
            assert f"client_id={fake.bot_user_id}" in invite

            inter = await fake.slash_command(alice, guild.channel, "imagine", {"prompt": "a fox"})
            followup = await inter.wait_followup(1, timeout=60)  # the downloaded model draws
            assert attachment_names(followup)[0].startswith("seed-")
            assert await first.stop() == 0
        finally:
            first.kill()

        hub.requests.clear()
        second = BotProcess.start(fake, cache, workdir, **env)
        try:
            await wait_connected(fake, second, 2)
            assert "unchanged since they were registered" in second.log()
            assert len(fake.command_syncs) == 1, "the restart registered the commands again"
            assert hub.requests == []  # the cached model loads without asking the Hub
            assert await second.stop() == 0
        finally:
            second.kill()


async def test_invite_prints_the_link_with_the_bot_id_scopes_and_permissions(
    fake_discord, model_cache, tmp_path
):
    done = await asyncio.to_thread(run_bot_command, fake_discord, model_cache, tmp_path, "invite")
    assert done.returncode == 0, done.stderr
    url = urlsplit(done.stdout.strip())
    query = parse_qs(url.query)
    assert (url.netloc, url.path) == ("discord.com", "/oauth2/authorize")
    assert query["client_id"] == [str(fake_discord.bot_user_id)]
    assert query["scope"] == ["bot applications.commands"]
    permissions = int(query["permissions"][0])
    needs = Perm.VIEW_CHANNEL | Perm.SEND_MESSAGES | Perm.ATTACH_FILES | Perm.EMBED_LINKS
    needs |= Perm.READ_MESSAGE_HISTORY
    assert permissions & needs == needs and permissions == PERMISSIONS.value
    assert not permissions & (Perm.ADMINISTRATOR | Perm.MANAGE_MESSAGES | Perm.MENTION_EVERYONE)
    assert ("GET", "/oauth2/applications/@me") in {
        (r.method, r.path) for r in fake_discord.requests
    }


async def test_doctor_reports_each_check_and_exits_1_when_one_fails(
    fake_discord, model_cache, tmp_path
):
    fake = fake_discord
    fake.add_guild("Open Server")
    strict = fake.add_guild("Strict Server")
    fake.deny_in_guild(strict, Perm.ATTACH_FILES)
    fake.set_message_content_intent(False)
    done = await asyncio.to_thread(
        run_bot_command, fake, model_cache, tmp_path, "doctor", MESSAGE_CONTENT="true", timeout=120
    )
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    marks = {line.split(":", 1)[0]: line for line in lines}
    for passed in ("✓ database", "✓ token", "✓ permissions in Open Server", "✓ model", "✓ device"):
        assert passed in marks, done.stdout
    assert "missing Attach Files" in marks["✗ permissions in Strict Server"]
    assert "Privileged Gateway Intents" in marks["✗ intents"]
    assert "not registered globally: " in marks["✗ commands"]
    assert {"imagine", "Vary"} <= set(
        marks["✗ commands"].split(" — ")[0].split(": ")[-1].split(", ")
    )
    assert "python -m bot sync" in marks["✗ commands"]
    assert any(line.startswith("✓ disk at ") for line in lines)
    assert all(line[0] in "✓✗" and (line[0] == "✓" or "— fix: " in line) for line in lines)
    assert fake.command_syncs == []  # the doctor looks, it does not register
