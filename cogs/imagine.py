"""/imagine: parse options, refuse bad input ephemerally, queue, and deliver the images."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from dataclasses import replace
from typing import Any

import discord
from discord import app_commands
from discord.ext import commands

from bot.executor import JobResult
from bot.images import grid, parameters_text, png_bytes
from bot.quota import (
    AdmissionRefused,
    MemberBanned,
    PromptBlocked,
    QuotaExceeded,
    ShuttingDown,
)
from bot.requests import (
    MAX_PROMPT_TOKENS,
    SCHEDULERS,
    GenerationRequest,
    InvalidRequest,
    Job,
    RawOptions,
)
from bot.service import ImagineService
from bot.store import MemberDefaults
from cogs.status import (
    CancelButton,
    Status,
    StatusBoard,
    cancel_view,
    eta_text,
    position_text,
)

log = logging.getLogger(__name__)

# Interaction tokens live 15 minutes; past this age we post to the channel instead.
FOLLOWUP_WINDOW_SECONDS = 14 * 60


def describe(request: GenerationRequest, seconds: float | None = None) -> discord.Embed:
    """Everything needed to reproduce the images, shown under them."""
    embed = discord.Embed(description=request.prompt[:4000], colour=discord.Colour.blurple())
    if request.negative_prompt:
        embed.add_field(name="Negative prompt", value=request.negative_prompt[:1024], inline=False)
    seeds = request.seeds
    embed.add_field(name="Seed" if len(seeds) == 1 else "Seeds", value=", ".join(map(str, seeds)))
    embed.add_field(name="Steps", value=str(request.steps))
    embed.add_field(name="Guidance", value=f"{request.guidance:g}")
    embed.add_field(name="Size", value=f"{request.width}×{request.height}")
    embed.add_field(name="Scheduler", value=request.scheduler)
    embed.add_field(name="Model", value=request.model[:1024])
    if seconds is not None:
        embed.set_footer(text=f"Generated in {seconds:.1f} s")
    return embed


def result_files(request: GenerationRequest, result: JobResult) -> tuple[list[discord.File], int]:
    """PNG files for the delivered images (a grid first when there are several), and how many
    images the safety checker withheld. Runs in a thread: encoding big grids is slow."""
    kept = [
        (seed, generated.image)
        for seed, generated in zip(request.seeds, result.images, strict=True)
        if not generated.withheld
    ]
    files = []
    if len(kept) > 1:
        files.append(
            discord.File(io.BytesIO(png_bytes(grid([img for _, img in kept]))), "grid.png")
        )
    for seed, image in kept:
        data = png_bytes(image, parameters_text(request, seed))
        files.append(discord.File(io.BytesIO(data), f"seed-{seed}.png"))
    return files, len(result.images) - len(kept)


class ImagineCog(commands.Cog):
    def __init__(self, bot: commands.Bot, service: ImagineService) -> None:
        self.bot = bot
        self.service = service
        # Interactions (and their tokens, which are secrets) live in memory only.
        self.board = StatusBoard(service)
        bot.status_board = self.board

    async def cog_load(self) -> None:
        self.service.add_listener(self.deliver)
        self.service.executor.on_progress = self.board.on_progress
        self.board.start()

    async def cog_unload(self) -> None:
        self.service.remove_listener(self.deliver)
        self.service.executor.on_progress = None
        await self.board.stop()

    @app_commands.command(name="imagine", description="Generate images from a text prompt")
    @app_commands.describe(
        prompt="What to draw",
        seed="Seed for a repeatable image (random when left out)",
        negative_prompt="What to keep out of the image",
        steps="Denoising steps: more is slower and finer",
        guidance="How closely to follow the prompt (classifier-free guidance scale)",
        width="Width in pixels, a multiple of 8",
        height="Height in pixels, a multiple of 8",
        scheduler="Sampling method",
        count="How many images (seeds follow on from the first)",
        preview="Only show what would run, its cost and ETA, with a Confirm button",
    )
    @app_commands.choices(scheduler=[app_commands.Choice(name=n, value=n) for n in SCHEDULERS])
    async def imagine(
        self,
        interaction: discord.Interaction,
        prompt: str,
        seed: int | None = None,
        negative_prompt: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        scheduler: str | None = None,
        count: int | None = None,
        preview: bool | None = None,
    ) -> None:
        arrived = time.monotonic()
        raw = RawOptions(
            prompt, seed, negative_prompt, steps, guidance, width, height, scheduler, count
        )
        raw, defaults = await self.service.with_member_defaults(raw, interaction.user.id)
        try:
            request = self.service.validate(raw)
        except InvalidRequest as problem:
            await interaction.response.send_message(refusal_text(problem), ephemeral=True)
            return
        if preview:
            await self.dry_run(interaction, request, private=defaults.private)
        else:
            await self.admit(interaction, request, private=defaults.private, arrived=arrived)

    async def admit(
        self,
        interaction: discord.Interaction,
        request: GenerationRequest,
        *,
        private: bool,
        arrived: float | None = None,
    ) -> Job | None:
        """The one way a Discord request enters the queue: admit it (one short SQLite
        transaction, well inside Discord's 3 seconds), then answer with the status message.
        Answering after admission lets a refusal stay private."""
        try:
            admission = await self.service.submit(
                request,
                member_id=interaction.user.id,
                guild_id=interaction.guild_id,
                channel_id=interaction.channel_id,
                interaction_id=interaction.id,
                exempt=self.service.is_exempt(role_ids(interaction.user)),
            )
        except AdmissionRefused as problem:
            await interaction.response.send_message(refusal_text(problem), ephemeral=True)
            return None
        job = admission.job
        status = Status(
            job.id,
            job.member_id,
            interaction,
            time.monotonic() if arrived is None else arrived,
            headline=f"Queued as job #{job.id}",
            detail=position_text(admission.position, None),
            notes=admission.notes,
            private=private,
        )
        self.board.track(status)
        await self.board.refresh_queue()
        await interaction.response.send_message(
            status.render(), view=cancel_view(job.id), ephemeral=private
        )
        status.shown, status.dirty = status.render(), False
        return job

    async def dry_run(
        self, interaction: discord.Interaction, request: GenerationRequest, *, private: bool
    ) -> None:
        """What would run, what it costs and when it would be done; nothing is stored."""
        tokens = self.service.runner.token_count(request.model, request.prompt)
        quota = await self.service.quota(
            interaction.guild_id,
            interaction.user.id,
            exempt=self.service.is_exempt(role_ids(interaction.user)),
        )
        wait = await self.service.estimate_wait(request)
        cost = f"{request.count} image(s)"
        cost += " (no limit)" if quota.unlimited else f" of your {quota.left} left today"
        lines = [
            "**Dry run**: nothing is queued until you press Confirm.",
            f"Prompt: {request.prompt[:300]}",
            f"Prompt tokens: {tokens} of {MAX_PROMPT_TOKENS}",
            *self.service.prompt_notes(request),
            f"Seeds {', '.join(map(str, request.seeds))} · {request.steps} steps · guidance "
            f"{request.guidance:g} · {request.width}×{request.height} · {request.scheduler}",
            f"Cost: {cost}",
            f"Ready in {eta_text(wait)} after you confirm.",
        ]
        view = ConfirmView(self, request, interaction, private=private)
        await interaction.response.send_message("\n".join(lines), view=view, ephemeral=True)

    @app_commands.command(name="settings", description="Your defaults for /imagine")
    @app_commands.describe(
        steps="Default steps",
        width="Default width in pixels",
        height="Default height in pixels",
        scheduler="Default sampling method",
        negative_prompt="Default negative prompt",
        count="Default number of images",
        private="Deliver your results only to you",
        reset="Forget all your defaults",
    )
    @app_commands.choices(scheduler=[app_commands.Choice(name=n, value=n) for n in SCHEDULERS])
    async def settings_command(
        self,
        interaction: discord.Interaction,
        steps: int | None = None,
        width: int | None = None,
        height: int | None = None,
        scheduler: str | None = None,
        negative_prompt: str | None = None,
        count: int | None = None,
        private: bool | None = None,
        reset: bool | None = None,
    ) -> None:
        store = self.service.store
        current = MemberDefaults() if reset else await store.member_defaults(interaction.user.id)
        wanted = replace(
            current,
            **{
                name: value
                for name, value in {
                    "steps": steps,
                    "width": width,
                    "height": height,
                    "scheduler": scheduler,
                    "negative_prompt": negative_prompt,
                    "count": count,
                    "private": private,
                }.items()
                if value is not None
            },
        )
        try:  # the same checks /imagine makes, so a saved default can never be refused later
            self.service.validate(
                RawOptions(
                    "check",
                    None,
                    wanted.negative_prompt,
                    wanted.steps,
                    None,
                    wanted.width,
                    wanted.height,
                    wanted.scheduler,
                    wanted.count,
                )
            )
        except InvalidRequest as problem:
            await interaction.response.send_message(
                f"{problem} Your defaults were not changed.", ephemeral=True
            )
            return
        await store.set_member_defaults(interaction.user.id, wanted)
        await interaction.response.send_message(defaults_text(wanted), ephemeral=True)

    async def deliver(self, result: JobResult) -> None:
        job = result.job
        request = job.request
        status = self.board.statuses.get(job.id)
        interaction, arrived = (status.interaction, status.arrived) if status else (None, 0.0)
        if status is not None:
            private = status.private
        else:  # admitted before a restart: the stored preference still holds
            private = (await self.service.store.member_defaults(job.member_id)).private
        if result.cancelled:
            await self.board.finish(
                job.id, f"Job #{job.id} was cancelled; its images were refunded."
            )
            await self.board.refresh_queue()
            return
        if result.error is not None:
            content = (
                f"<@{job.member_id}> job #{job.id} failed: {result.error}. "
                "Its images were refunded."
            )
            await self._post(job, interaction, arrived, private, content=content)
            await self.board.finish(job.id, None)
            await self.board.refresh_queue()
            return
        files, withheld = await asyncio.to_thread(result_files, request, result)
        lines = [f"<@{job.member_id}> job #{job.id}"]
        if withheld:
            lines.append(f"{withheld} of {request.count} image(s) withheld by the safety checker.")
            if withheld == request.count:
                lines.append("They were refunded.")
        await self._post(
            job,
            interaction,
            arrived,
            private,
            content="\n".join(lines),
            embed=describe(request, result.seconds),
            files=files,
        )
        await self.board.finish(job.id, None)  # the result replaces the status and preview
        await self.board.refresh_queue()

    async def _post(
        self,
        job: Job,
        interaction: discord.Interaction | None,
        arrived: float,
        private: bool,
        **message: Any,
    ) -> None:
        """Follow up while the interaction token is young; else post in the channel with a nonce
        (so a retry after a crash cannot post twice); if the channel refuses us, or the member
        wants results privately, send a DM."""
        sent = None
        if interaction is not None and time.monotonic() - arrived < FOLLOWUP_WINDOW_SECONDS:
            try:
                sent = await interaction.followup.send(wait=True, ephemeral=private, **message)
            except discord.NotFound:  # the token expired early or the interaction is gone
                log.info("follow-up for job %s failed; posting in the channel", job.id)
        if sent is None:
            sent = await self._post_outside_interaction(job, message, private)
        if sent is not None:
            await self.service.store.record_delivery(job.id, sent.channel.id, sent.id)

    async def _post_outside_interaction(
        self, job: Job, message: dict[str, Any], private: bool
    ) -> discord.Message | None:
        if not private:
            for file in message.get("files", []):
                file.reset()
            try:
                channel = self.bot.get_channel(job.channel_id) or await self.bot.fetch_channel(
                    job.channel_id
                )
                return await channel.send(nonce=f"imagine-job-{job.id}", **message)
            except (discord.Forbidden, discord.NotFound):
                log.warning("cannot post job %s in channel %s; trying a DM", job.id, job.channel_id)
        for file in message.get("files", []):
            file.reset()
        try:
            member = await self.bot.fetch_user(job.member_id)
            return await member.send(**message)
        except discord.HTTPException:
            log.warning("cannot deliver job %s to member %s at all", job.id, job.member_id)
            return None


class ConfirmView(discord.ui.View):
    """The dry run's Confirm button: admits the shown request once, then leaves the panel.
    It lives in memory (a dry run is a moment's decision): ten minutes, or until a restart."""

    def __init__(
        self,
        cog: ImagineCog,
        request: GenerationRequest,
        panel: discord.Interaction,
        *,
        private: bool,
    ) -> None:
        super().__init__(timeout=600)
        self.cog = cog
        self.request = request
        self.panel = panel
        self.private = private
        self.used = False

    @discord.ui.button(label="Confirm", style=discord.ButtonStyle.primary)
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        if self.used:  # a double click racing the panel's update
            await interaction.response.send_message("Already confirmed.", ephemeral=True)
            return
        self.used = True
        self.stop()
        job = await self.cog.admit(interaction, self.request, private=self.private)
        text = f"Confirmed as job #{job.id}." if job else "Not queued: see the message above."
        with contextlib.suppress(discord.HTTPException):
            await self.panel.edit_original_response(content=text, view=None)


def defaults_text(defaults: MemberDefaults) -> str:
    shown = [
        f"{label}: {value}"
        for label, value in (
            ("steps", defaults.steps),
            ("width", defaults.width),
            ("height", defaults.height),
            ("scheduler", defaults.scheduler),
            ("negative prompt", defaults.negative_prompt),
            ("count", defaults.count),
        )
        if value is not None
    ]
    where = "privately (only you see them)" if defaults.private else "in the channel"
    listed = "; ".join(shown) if shown else "none (the server's defaults apply)"
    return f"Your defaults: {listed}. Results are delivered {where}."


def role_ids(user: discord.abc.User) -> list[int]:
    return [role.id for role in getattr(user, "roles", [])]


def relative_time(timestamp: float) -> str:
    """Discord renders this as "in 3 hours" in each reader's own language and time zone."""
    return f"<t:{int(timestamp)}:R>"


def refusal_text(problem: Exception) -> str:
    """What a member reads when a request is turned away; nothing was queued or charged."""
    if isinstance(problem, InvalidRequest):
        return f"{problem} Nothing was queued."
    if isinstance(problem, QuotaExceeded):
        status = problem.status
        when = (
            f" The next image frees up {relative_time(status.next_free_at)}."
            if (status.next_free_at)
            else ""
        )
        return (
            f"You have used {status.used} of your {status.limit} images for the last 24 hours "
            f"and asked for {problem.asked}.{when}"
        )
    if isinstance(problem, MemberBanned):
        reason = f" Reason: {problem.reason}" if problem.reason else ""
        return f"Sorry, you can't generate images on this server.{reason}"
    if isinstance(problem, ShuttingDown):
        return "The bot is restarting; please try again in a minute. Nothing was charged."
    if isinstance(problem, PromptBlocked):
        return "Your prompt contains a term this server blocks. Nothing was queued or charged."
    raise TypeError(problem)


async def setup(bot: commands.Bot) -> None:
    bot.add_dynamic_items(CancelButton)
    await bot.add_cog(ImagineCog(bot, bot.service))
