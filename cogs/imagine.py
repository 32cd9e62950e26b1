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
from bot.images import ImageRejected, grid, parameters_text, png_bytes
from bot.quota import AdmissionRefused
from bot.requests import (
    MAX_PROMPT_TOKENS,
    SCHEDULERS,
    GenerationRequest,
    InvalidRequest,
    Job,
    RawOptions,
)
from bot.service import ImagineService, PreparedImage
from bot.store import MemberDefaults
from cogs.common import refusal_text, refuse, role_ids
from cogs.status import (
    CancelButton,
    Status,
    StatusBoard,
    cancel_view,
    eta_text,
    position_text,
)
from cogs.variations import result_view

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
    if request.strength is not None:
        embed.add_field(name="Strength", value=f"{request.strength:g} (from an image)")
    if seconds is not None:
        embed.set_footer(text=f"Generated in {seconds:.1f} s")
    return embed


def result_files(
    request: GenerationRequest, result: JobResult
) -> tuple[list[discord.File], list[int]]:
    """PNG files for the delivered images (a grid first when there are several), and the
    indexes of the images the safety checker let through. Runs in a thread: encoding big
    grids is slow."""
    kept = [index for index, generated in enumerate(result.images) if not generated.withheld]
    files = []
    if len(kept) > 1:
        sheet = grid([result.images[index].image for index in kept])
        files.append(discord.File(io.BytesIO(png_bytes(sheet)), "grid.png"))
    for index in kept:
        seed = request.seeds[index]
        data = png_bytes(result.images[index].image, parameters_text(request, seed))
        files.append(discord.File(io.BytesIO(data), f"seed-{seed}.png"))
    return files, kept


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
        image="A picture to start from (PNG, JPEG or WebP) instead of noise",
        strength="With an image: how far to move from it, 0.05 (barely) to 1 (completely)",
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
        image: discord.Attachment | None = None,
        strength: float | None = None,
        preview: bool | None = None,
    ) -> None:
        arrived = time.monotonic()
        raw = RawOptions(
            prompt,
            seed,
            negative_prompt,
            steps,
            guidance,
            width,
            height,
            scheduler,
            count,
            strength,
        )
        raw, defaults = await self.service.with_member_defaults(raw, interaction.user.id)
        prepared = None
        if image is not None and (prepared := await self.read_image(interaction, image)) is None:
            return
        try:
            request = self.service.validate(raw, prepared)
        except InvalidRequest as problem:
            await interaction.response.send_message(refusal_text(problem), ephemeral=True)
            return
        if preview:
            await self.dry_run(interaction, request, private=defaults.private, image=prepared)
        else:
            await self.admit(
                interaction, request, private=defaults.private, arrived=arrived, init_image=prepared
            )

    async def admit(
        self,
        origin: discord.Interaction | discord.Message,
        request: GenerationRequest,
        *,
        private: bool = False,
        arrived: float | None = None,
        parent: tuple[int, int] | None = None,
        init_image: PreparedImage | None = None,
    ) -> Job | None:
        """The one way a Discord request enters the queue: admit it (one short SQLite
        transaction, well inside Discord's 3 seconds), then answer with the status message,
        as the interaction's response or as a reply to the member's message. Answering after
        admission lets a refusal stay private."""
        interaction = origin if isinstance(origin, discord.Interaction) else None
        member = origin.user if interaction else origin.author
        try:
            admission = await self.service.submit(
                request,
                member_id=member.id,
                guild_id=origin.guild.id if origin.guild else None,
                channel_id=origin.channel.id,
                interaction_id=interaction.id if interaction else None,
                exempt=self.service.is_exempt(role_ids(member)),
                parent=parent,
                init_image=init_image,
            )
        except AdmissionRefused as problem:
            await refuse(origin, refusal_text(problem))
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
            origin=None if interaction else origin,
        )
        self.board.track(status)
        await self.board.refresh_queue()
        if interaction is not None:
            await interaction.response.send_message(
                status.render(), view=cancel_view(job.id), ephemeral=private
            )
        else:
            status.message = await origin.reply(
                status.render(), view=cancel_view(job.id), mention_author=False
            )
        status.shown, status.dirty = status.render(), False
        return job

    async def read_image(
        self, origin: discord.Interaction | discord.Message, attachment: discord.Attachment
    ) -> PreparedImage | None:
        """Download (after checking the announced size) and prepare an image, or tell the
        member why not and return None."""
        limit = self.service.settings.max_upload_bytes
        if attachment.size > limit:
            await refuse(
                origin,
                f"The image is {attachment.size / 2**20:.1f} MiB; the limit is "
                f"{limit / 2**20:g} MiB. Nothing was queued.",
            )
            return None
        try:
            return await self.service.prepare_init_image(await attachment.read())
        except ImageRejected as problem:
            await refuse(origin, f"{problem} Nothing was queued.")
        except discord.HTTPException:
            await refuse(origin, "I could not download that image; please try again.")
        return None

    async def dry_run(
        self,
        interaction: discord.Interaction,
        request: GenerationRequest,
        *,
        private: bool,
        image: PreparedImage | None = None,
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
        view = ConfirmView(self, request, interaction, private=private, image=image)
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
        reply_to = status.origin if status else None
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
            await self._post(job, interaction, arrived, private, reply_to, content=content)
            await self.board.finish(job.id, None)
            await self.board.refresh_queue()
            return
        files, kept = await asyncio.to_thread(result_files, request, result)
        withheld = request.count - len(kept)
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
            reply_to,
            withheld=withheld,
            content="\n".join(lines),
            embed=describe(request, result.seconds),
            files=files,
            view=result_view(job.id, kept),
        )
        await self.board.finish(job.id, None)  # the result replaces the status and preview
        await self.board.refresh_queue()

    async def _post(
        self,
        job: Job,
        interaction: discord.Interaction | None,
        arrived: float,
        private: bool,
        reply_to: discord.Message | None,
        withheld: int | None = None,
        **message: Any,
    ) -> None:
        """Follow up while the interaction token is young; else post in the channel with a nonce
        (so a retry after a crash cannot post twice); if the channel refuses us, or the member
        wants results privately, send a DM. A result (`withheld` given) is recorded in the
        store with the message that carries it."""
        sent = None
        if job.attempts > 1 and not private and withheld is not None:
            sent = await self._earlier_post(job)
        if (
            sent is None
            and interaction is not None
            and time.monotonic() - arrived < FOLLOWUP_WINDOW_SECONDS
        ):
            try:
                sent = await interaction.followup.send(wait=True, ephemeral=private, **message)
            except discord.NotFound:  # the token expired early or the interaction is gone
                log.info("follow-up for job %s failed; posting in the channel", job.id)
        if sent is None:
            if reply_to is not None:
                message["reference"] = reply_to
                message["mention_author"] = True
            sent = await self._post_outside_interaction(job, message, private)
        if sent is not None and withheld is not None:
            await self.service.store.record_delivery(job.id, sent.channel.id, sent.id, withheld)

    async def _earlier_post(self, job: Job) -> discord.Message | None:
        """A result posted before the process died, between posting and recording it: found
        in the channel's recent history, so a rerun after a crash does not post twice."""
        headline = f"<@{job.member_id}> job #{job.id}"
        try:
            channel = self.bot.get_channel(job.channel_id) or await self.bot.fetch_channel(
                job.channel_id
            )
            async for message in channel.history(limit=50):
                if message.author == self.bot.user and message.content.split("\n")[0] == headline:
                    return message
        except discord.HTTPException:
            pass
        return None

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
        message.pop("reference", None)
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
        image: PreparedImage | None,
    ) -> None:
        super().__init__(timeout=600)
        self.cog = cog
        self.request = request
        self.panel = panel
        self.private = private
        self.image = image
        self.used = False

    @discord.ui.button(label="Confirm", style=discord.ButtonStyle.primary)
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button) -> None:
        if self.used:  # a double click racing the panel's update
            await interaction.response.send_message("Already confirmed.", ephemeral=True)
            return
        self.used = True
        self.stop()
        job = await self.cog.admit(
            interaction, self.request, private=self.private, init_image=self.image
        )
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


async def setup(bot: commands.Bot) -> None:
    bot.add_dynamic_items(CancelButton)
    await bot.add_cog(ImagineCog(bot, bot.service))
