"""`python -m bot doctor`: every check a new server owner would otherwise find out about one
failure at a time, each on one line with ✓ or ✗ and, for ✗, the fix. Nothing is downloaded
and nothing is registered; the exit status is 1 if any check failed."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import aiohttp
import discord

from bot.db import Store, state
from bot.db.schema import MIGRATIONS
from bot.discord_setup import (
    PERMISSIONS,
    command_payloads,
    invite_url,
    permission_names,
    registered_names,
)
from bot.downloads import disk_free, size_text, source_available
from bot.models import LoraEntry, ModelEntry, ModelsFileError, load_catalog

if TYPE_CHECKING:
    from bot.app import ImagineBot
    from bot.settings import Settings

MIN_FREE_DISK = 10**9  # room for the database, logs and a model update
GiB = 2**30


@dataclass
class Report:
    """The lines printed so far; `failed` once any check has failed."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    failed: bool = False

    def ok(self, name: str, detail: str) -> None:
        print(f"✓ {name}: {detail}", file=self.out, flush=True)

    def fail(self, name: str, detail: str, fix: str) -> None:
        self.failed = True
        print(f"✗ {name}: {detail} — fix: {fix}", file=self.out, flush=True)


async def run(
    settings: Settings,
    offline_bot: Callable[[], AbstractAsyncContextManager[ImagineBot]],
    report: Report,
) -> int:
    """Run every check; `offline_bot` gives the bot with its cogs loaded, not yet logged in."""
    if await check_database(settings, report):
        async with offline_bot() as bot:
            await check_discord(settings, bot, report)
    else:
        report.fail("discord", "not checked", "make the database usable first (see above)")
    await asyncio.to_thread(check_models, settings, report)
    check_device(settings, report)
    check_disk(settings, report)
    return 1 if report.failed else 0


async def check_database(settings: Settings, report: Report) -> bool:
    """Open and migrate the database as the bot would; False when it is unusable or too new."""
    path = settings.database_path
    try:
        store = await Store.open(path)  # migrates it, as the bot does on start
        try:
            version = await store.schema_version()
            await store.write(state.put, "doctor:checked_at", str(time.time()))
        finally:
            await store.close()
    except (sqlite3.Error, OSError) as problem:
        report.fail(
            "database",
            f"{path} cannot be written ({problem})",
            "point DATABASE_PATH at a file in a folder the bot's user may write",
        )
        return False
    if version > len(MIGRATIONS):
        report.fail(
            "database",
            f"{path} is at schema {version}, newer than this bot's {len(MIGRATIONS)}",
            "update the bot, or point DATABASE_PATH at another file",
        )
        return False
    report.ok("database", f"{path} is writable, migrations current ({version} of {version})")
    return True


async def check_discord(settings: Settings, bot: ImagineBot, report: Report) -> None:
    """Token, intents, permissions in each server, registered commands."""
    try:
        await bot.login(settings.discord_token)
    except discord.LoginFailure:
        report.fail(
            "token",
            "Discord refused DISCORD_TOKEN",
            "copy the token again (developer portal → Bot → Reset Token) into .env",
        )
        return
    except (OSError, aiohttp.ClientError) as problem:
        where = settings.discord_api_base or "discord.com"
        report.fail("token", f"cannot reach Discord at {where} ({problem})", "check the network")
        return
    assert bot.user is not None and bot.application_id is not None
    report.ok("token", f"accepted: {bot.user} (application {bot.application_id})")
    check_intents(settings, bot, report)
    await check_permissions(bot, report)
    await check_commands(settings, bot, report)


def check_intents(settings: Settings, bot: ImagineBot, report: Report) -> None:
    if not settings.message_content:
        report.ok("intents", "no privileged intent needed (MESSAGE_CONTENT=false)")
        return
    flags = bot.application.flags if bot.application else discord.ApplicationFlags()
    if flags.gateway_message_content or flags.gateway_message_content_limited:
        report.ok("intents", "Message Content is enabled for MESSAGE_CONTENT=true")
    else:
        report.fail(
            "intents",
            "MESSAGE_CONTENT=true but the Message Content intent is off",
            "switch it on (developer portal → Bot → Privileged Gateway Intents) "
            "or set MESSAGE_CONTENT=false",
        )


async def check_permissions(bot: ImagineBot, report: Report) -> None:
    assert bot.application_id is not None
    link = invite_url(bot.application_id)
    guilds = await bot.http.get_guilds(200)
    if not guilds:
        report.fail("servers", "the bot is in no server yet", f"open {link}")
    for guild in guilds:
        have = discord.Permissions(int(guild.get("permissions") or 0))
        if have.administrator:
            have = discord.Permissions.all()
        missing = discord.Permissions(PERMISSIONS.value & ~have.value)
        if missing.value:
            report.fail(
                f"permissions in {guild['name']}",
                f"missing {', '.join(permission_names(missing))}",
                f"give the bot's role these permissions, or invite it again with {link}",
            )
        else:
            report.ok(f"permissions in {guild['name']}", ", ".join(permission_names(PERMISSIONS)))


async def check_commands(settings: Settings, bot: ImagineBot, report: Report) -> None:
    """The slash commands Discord has against the bot's own, so a stale registration shows."""
    guild_id = settings.dev_guild_id
    where = "globally" if guild_id is None else f"in server {guild_id}"
    expected = {payload["name"] for payload in command_payloads(bot.tree, guild_id)}
    try:
        registered = await registered_names(bot.tree, guild_id)
    except discord.HTTPException as problem:
        report.fail("commands", f"cannot list them {where} ({problem.text})", "check DEV_GUILD_ID")
        return
    missing, extra = sorted(expected - registered), sorted(registered - expected)
    if missing or extra:
        detail = "; ".join(
            part
            for part in (
                missing and f"not registered {where}: {', '.join(missing)}",
                extra and f"registered but no longer in the bot: {', '.join(extra)}",
            )
            if part
        )
        report.fail(
            "commands", detail, "start the bot (it registers them) or run `python -m bot sync`"
        )
    else:
        report.ok("commands", f"{len(expected)} registered {where}: {', '.join(sorted(expected))}")


def check_models(settings: Settings, report: Report) -> None:
    """Each model and LoRA of the allowlist (else MODEL_ID) on this machine, at the revision
    it pins, one line each; nothing is downloaded. The default model also loads on the chosen
    device (from that revision's snapshot)."""
    try:
        catalog = load_catalog(settings.models_file, settings.model_id)
    except ModelsFileError as problem:
        report.fail("models", str(problem), "correct it (models.example.toml shows the keys)")
        return
    allowlist = settings.models_file.is_file()
    fetch = "run `python -m bot download`"
    if not allowlist:
        fetch = f"start the bot (it downloads it) or {fetch}"
    entries = [("model", m) for m in catalog.models.values()]
    entries += [("lora", lora) for lora in catalog.loras.values()]
    for kind, entry in entries:
        name = f"{'model' if kind == 'model' else 'LoRA'} {entry.name}" if allowlist else kind
        source = _pinned(entry)
        if not source_available(kind, entry.source, settings.model_cache, entry.revision):
            report.fail(name, f"{source} is not in {settings.model_cache}", fetch)
        elif entry.name == catalog.default and kind == "model":
            check_loads(settings, entry, name, report)
        else:
            report.ok(name, f"{source} is here")


def check_loads(settings: Settings, entry: ModelEntry, name: str, report: Report) -> None:
    from bot.pipelines import ModelNotAvailable, PipelineOptions, load_pipeline

    options = PipelineOptions(
        device=settings.device,
        dtype=None if settings.dtype == "auto" else settings.dtype,
        cache_dir=settings.model_cache,
        safety_checker=settings.safety_checker,
        revision=entry.revision,
    )
    started = time.monotonic()
    try:
        pipe = load_pipeline(entry.source, options)
    except (ModelNotAvailable, ValueError, OSError, RuntimeError) as problem:
        report.fail(name, str(problem).splitlines()[0], "see the message; `download` fetches")
        return
    seconds = time.monotonic() - started
    report.ok(name, f"{_pinned(entry)} loads on {pipe.device} in {seconds:.1f} s")
    del pipe


def _pinned(entry: ModelEntry | LoraEntry) -> str:
    """An entry's source, and the commit it is pinned to if any."""
    return entry.source + ("" if entry.revision is None else f" at {entry.revision}")


def check_device(settings: Settings, report: Report) -> None:
    from bot.pipelines import CudaMemory, resolve_device

    try:
        device, dtype = resolve_device(
            settings.device, None if settings.dtype == "auto" else settings.dtype
        )
    except ValueError as problem:
        report.fail("device", str(problem), "set DEVICE=auto (or cpu) and DTYPE=auto")
        return
    detail = f"{device} {str(dtype).removeprefix('torch.')}"
    if device.type == "cuda":
        detail += f", {CudaMemory(device).free() / GiB:.1f} GiB of GPU memory free"
    elif device.type == "cpu":
        detail += " (no GPU: an image takes minutes)"
    report.ok("device", detail)


def check_disk(settings: Settings, report: Report) -> None:
    folders = {Path(settings.model_cache), Path(settings.database_path).parent}
    for folder in sorted(folders):
        free = disk_free(folder)
        if free < MIN_FREE_DISK:
            report.fail(
                f"disk at {folder}",
                f"{size_text(free)} free",
                f"free at least {size_text(MIN_FREE_DISK)} there (the database and models grow)",
            )
        else:
            report.ok(f"disk at {folder}", f"{size_text(free)} free")
