"""Command line: run the bot (default), generate, sync, download, invite, doctor.

python -m bot                      run the bot (downloads the model and registers the commands
                                   the first time)
python -m bot generate "a prompt" --seed 42 --out panda.png
python -m bot sync [--guild ID]    register the commands now, even if unchanged
python -m bot download [MODEL_ID]  fetch every model and LoRA of models.toml (else MODEL_ID),
                                   or the one named
python -m bot invite               print the link that adds the bot to a server
python -m bot doctor               check token, intents, permissions, commands, model, disk
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import discord

from bot.intake import Intake
from bot.logs import configure_logging
from bot.requests import InvalidRequest, RawOptions
from bot.settings import Settings, SettingsError, load_settings

log = logging.getLogger("bot")


async def open_service(settings: Settings):
    """The store, the model runner and the executor, wired together but not yet started; the
    runner and the service share the one catalog of models (models.toml, else MODEL_ID)."""
    from bot.db import Store
    from bot.models import load_catalog
    from bot.pipelines import PipelineOptions, PipelineRunner
    from bot.service import ImagineService

    catalog = load_catalog(settings.models_file, settings.model_id)  # before the store opens
    store = await Store.open(settings.database_path)
    # With EXECUTOR=ray the workers hold the models on DEVICE; the bot's own runner only
    # counts prompt tokens, so it stays off the GPUs.
    runner = PipelineRunner(
        PipelineOptions(
            device="cpu" if settings.executor == "ray" else settings.device,
            dtype=None if settings.dtype == "auto" else settings.dtype,
            cache_dir=settings.model_cache,
            attention_slicing=settings.attention_slicing,
            vae_decode_batch=settings.vae_decode_batch,
            channels_last=settings.channels_last,
            compile_unet=settings.torch_compile,
            max_batch_size=settings.max_batch_size,
            largest_side=settings.limits.max_side,
            safety_checker=settings.safety_checker,
            keep_flagged=settings.nsfw_channels == "allow",
            memory_budget_bytes=(
                None if settings.model_memory_gb is None else int(settings.model_memory_gb * 2**30)
            ),
            vae_tiling_pixels=settings.vae_tiling_pixels,
        ),
        catalog,
    )
    return ImagineService(settings, store, runner, catalog)


def make_bot(settings: Settings, service):
    from bot.app import ImagineBot
    from bot.discord_api import use_api_base

    if settings.discord_api_base:
        use_api_base(settings.discord_api_base)
    return ImagineBot(settings, service)


async def run_bot(settings: Settings) -> None:
    from bot.lifecycle import online, shut_down

    service = await open_service(settings)
    bot = make_bot(settings, service)

    stopping: list[asyncio.Task[None]] = []  # held, so the task cannot be garbage-collected

    def on_signal() -> None:
        log.info("shutting down (up to %.0f s for the running batch)", settings.shutdown_grace)
        stopping.append(asyncio.ensure_future(shut_down(settings, service, bot)))

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    try:
        async with online(settings, service, bot) as connection:
            await connection  # until a signal's shut_down (or a failure) leaves the gateway
    finally:
        log.info("stopped")


@asynccontextmanager
async def offline_bot(settings: Settings) -> AsyncIterator:
    """The bot with its store and cogs (so its command tree), not logged in or connected."""
    service = await open_service(settings)
    try:
        async with make_bot(settings, service) as bot:
            yield bot
    finally:
        await service.store.close()


async def sync_commands(settings: Settings, guild_id: int | None) -> None:
    """Register the commands even if unchanged, and record their hash as a start would."""
    from bot.discord_setup import register_commands

    async with offline_bot(settings) as bot:
        await bot.login(settings.discord_token)
        synced = await register_commands(bot.tree, bot.store, guild_id, force=True)
        where = f"guild {guild_id}" if guild_id else "every server (may take up to an hour)"
        names = ", ".join(c.name for c in synced or [])
        print(f"synced {len(synced or [])} command(s) to {where}: {names}")


async def print_invite(settings: Settings) -> None:
    from bot.discord_setup import fetch_application_id, invite_url

    if settings.discord_api_base:
        from bot.discord_api import use_api_base

        use_api_base(settings.discord_api_base)
    print(invite_url(await fetch_application_id(settings.discord_token)))


async def doctor(settings: Settings) -> int:
    from bot import doctor

    return await doctor.run(settings, lambda: offline_bot(settings), doctor.Report())


async def generate(settings: Settings, args: argparse.Namespace) -> int:
    """Generate through the same store and executor the bot uses, without Discord."""
    service = await open_service(settings)
    raw = RawOptions(
        args.prompt,
        args.seed,
        args.negative_prompt,
        args.steps,
        args.guidance,
        args.width,
        args.height,
        args.scheduler,
        args.count,
        model=args.model,
        loras=args.lora,
    )
    try:
        await service.check_sources()  # the model's family decides what validation allows
        request = service.validate(raw)
    except InvalidRequest as problem:
        await service.store.close()
        print(f"error: {problem}", file=sys.stderr)
        return 2
    done: asyncio.Future = asyncio.get_running_loop().create_future()

    async def collect(result) -> None:
        if result.job.id == admission.job.id and not done.done():
            done.set_result(result)

    service.add_listener(collect)
    try:
        await service.start()
        # The owner's own terminal, not a Discord channel: their `nsfw` models work here too.
        admission = await service.submit(request, Intake(0, age_restricted=True))
        result = await done
        await service.executor.wait_idle()  # the job is marked done after its delivery
    finally:
        await service.close()
    if result.error:
        print(f"error: {result.error}", file=sys.stderr)
        return 1
    from bot.images import parameters_text, png_bytes

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for seed, generated in zip(request.seeds, result.images, strict=True):
        path = out if request.count == 1 else out.with_stem(f"{out.stem}-{seed}")
        if generated.withheld:
            print(f"seed {seed}: withheld by the safety checker", file=sys.stderr)
            continue
        path.write_bytes(png_bytes(generated.image, parameters_text(request, seed)))
        print(f"wrote {path} (seed {seed}, {result.seconds:.1f} s)")
    return 0


def download(settings: Settings, model_id: str | None) -> int:
    """Fetch `model_id`, or every model and LoRA of the allowlist (without one: MODEL_ID), into
    the cache, so the bot can start offline (HF_HUB_OFFLINE=1). Models of the allowlist and
    LoRAs are taken as safetensors only. Returns 1 if any could not be fetched."""
    from bot.downloads import (
        ModelNotAvailable,
        fetch_lora,
        fetch_model,
        is_hub_model,
        source_available,
    )
    from bot.models import load_catalog

    allowlist = model_id is None and settings.models_file.is_file()
    catalog = load_catalog(settings.models_file, model_id or settings.model_id)
    sources = catalog.sources() if model_id is None else [("model", model_id, None)]
    cache, failed = settings.model_cache, 0
    for kind, source, revision in sources:  # revision: the commit models.toml pins, or None
        try:
            if not is_hub_model(source):
                if not source_available(kind, source, cache):
                    raise ModelNotAvailable(f"{source} is not a Hub id, and no such path exists")
                print(f"{source} is built in or on disk: nothing to download")
            elif kind == "lora":
                print(f"{source} is in {fetch_lora(source, cache, revision=revision)}")
            else:
                folder = fetch_model(source, cache, safetensors_only=allowlist, revision=revision)
                print(f"{source} is in {folder}")
        except ModelNotAvailable as problem:
            print(f"error: {problem}", file=sys.stderr)
            failed = 1
    return failed


def _interruptible(fetch: Callable[[], int | None]) -> int:
    """Run a download; Ctrl-C ends it with a line instead of a traceback (it resumes)."""
    try:
        return fetch() or 0
    except KeyboardInterrupt:
        print("interrupted; the download resumes where it stopped next time", file=sys.stderr)
        return 130


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line: run (the default), generate, sync, download, invite, doctor."""
    parser = argparse.ArgumentParser(prog="python -m bot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the bot (the default)")
    gen = sub.add_parser("generate", help="generate images locally, without Discord")
    gen.add_argument("prompt")
    gen.add_argument("--seed", type=int)
    gen.add_argument("--negative-prompt")
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance", type=float)
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("--scheduler")
    gen.add_argument("--count", type=int)
    gen.add_argument("--model", help="a name from models.toml (default: its default)")
    gen.add_argument("--lora", help='LoRAs as "name:weight other", from models.toml')
    gen.add_argument("--out", default="image.png", help="PNG path (several images get -SEED)")
    sync = sub.add_parser("sync", help="register the slash commands with Discord")
    sync.add_argument("--guild", type=int, help="sync to one server at once instead of globally")
    dl = sub.add_parser("download", help="fetch the models and LoRAs into MODEL_CACHE")
    dl.add_argument(
        "model_id", nargs="?", help="one Hub id (default: all of models.toml, else MODEL_ID)"
    )
    sub.add_parser("invite", help="print the link that adds the bot to a server")
    sub.add_parser("doctor", help="check the set-up, one line per check; exit 1 if one fails")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; a set-up problem ends in one line and an exit code, not a traceback."""
    args = parse_args(argv)
    command = args.command or "run"
    try:
        settings = load_settings(require_token=command in ("run", "sync", "invite", "doctor"))
    except SettingsError as problem:
        print(f"configuration error: {problem}", file=sys.stderr)
        return 2
    configure_logging(
        settings.log_level, [settings.discord_token], log_prompts=settings.log_prompts
    )
    if command == "download":  # the Hub client reads this once, at import
        os.environ["HF_HUB_OFFLINE"] = "0"
    from bot.downloads import ModelNotAvailable, fetch_if_missing

    try:
        if command == "generate":
            return asyncio.run(generate(settings, args))
        if command == "doctor":
            return asyncio.run(doctor(settings))
        if command == "sync":
            asyncio.run(sync_commands(settings, args.guild or settings.dev_guild_id))
        elif command == "invite":
            asyncio.run(print_invite(settings))
        elif command == "download":
            return _interruptible(lambda: download(settings, args.model_id))
        else:
            # Before the model and Discord: a refusal (no disk space) costs nothing else. With
            # an allowlist, start-up never downloads: `python -m bot download` fetches it all.
            model, cache = settings.model_id, settings.model_cache
            allowed = settings.auto_download and not settings.models_file.is_file()
            stopped = _interruptible(lambda: fetch_if_missing(model, cache, allowed=allowed))
            if stopped:
                return stopped
            asyncio.run(run_bot(settings))
    except SettingsError as problem:  # models.toml, read when the service is built
        print(f"configuration error: {problem}", file=sys.stderr)
        return 2
    except ModelNotAvailable as problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    except discord.LoginFailure:
        print("error: Discord refused DISCORD_TOKEN; copy the bot token again", file=sys.stderr)
        return 1
    except (OSError, aiohttp.ClientError) as problem:
        where = settings.discord_api_base or "discord.com"
        print(f"error: cannot reach Discord at {where}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
