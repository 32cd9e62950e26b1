"""/imagine: the options and the typed prompt handed to the admission desk, or a dry run of what
it would queue (the parsed prompt, every job, cost and ETA) with a Confirm button. Results are
posted by cogs/delivery.py."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.models import MAX_LORAS_TEXT, MAX_NAME_CHARS
from bot.prompts import ParsedPrompt, parse_weights, weighted_terms
from bot.quota import cost_text, units_phrase
from bot.requests import ALL_SCHEDULERS, GenerationRequest, RawOptions
from bot.service import ImagineService, prompt_chunks
from cogs.buttons import ConfirmView
from cogs.common import loras_text, server_only, standing_text
from cogs.entry import Ask, Prepared
from cogs.models import age_restricted, lora_choices, model_choices
from cogs.status import eta_text

if TYPE_CHECKING:
    from bot.app import ImagineBot


class ImagineCog(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot

    @app_commands.command(name="imagine", description="Generate images from a text prompt")
    @app_commands.guild_only()
    @server_only
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
        model="The model to draw with (see /models)",
        lora="LoRAs to add, as name:weight (weight from -2 to 2), separated by spaces",
    )
    @app_commands.choices(scheduler=[app_commands.Choice(name=n, value=n) for n in ALL_SCHEDULERS])
    async def imagine(
        self,
        interaction: discord.Interaction[ImagineBot],
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
        model: app_commands.Range[str, 1, MAX_NAME_CHARS] | None = None,
        lora: app_commands.Range[str, 1, MAX_LORAS_TEXT] | None = None,
    ) -> None:
        """The options and the typed prompt to the desk: queued, or shown as a dry run."""
        desk = self.bot.desk
        options = RawOptions(
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
            model,
            lora,
        )
        entry = await desk.entry(interaction)
        ask = Ask(options, parsed=desk.parse(prompt), image=image)
        if preview:
            await self.dry_run(interaction, await desk.prepare(entry, ask))
        else:
            await desk.admit(entry, ask)

    @imagine.autocomplete("model")
    async def model_autocomplete(
        self, interaction: discord.Interaction[ImagineBot], typed: str
    ) -> list[app_commands.Choice[str]]:
        here = age_restricted(interaction.channel)
        return model_choices(self.bot.service.catalog, typed, age_restricted=here)

    @imagine.autocomplete("lora")
    async def lora_autocomplete(
        self, interaction: discord.Interaction[ImagineBot], typed: str
    ) -> list[app_commands.Choice[str]]:
        model = interaction.namespace.model
        chosen = model[:MAX_NAME_CHARS].strip() if isinstance(model, str) else None
        return lora_choices(self.bot.service.catalog, chosen or None, typed)

    async def dry_run(
        self, interaction: discord.Interaction[ImagineBot], prepared: Prepared
    ) -> None:
        """What would run (the parsed prompt and every job it makes), what it costs and when
        it would be done; nothing is stored. Every job costs what the first does, and each is
        charged on its own: the quota is checked against their total."""
        service, requests = self.bot.service, prepared.requests
        intake = prepared.entry.intake
        request = requests[0]
        quota = await service.quota(intake.guild_id, intake.member_id, exempt=intake.exempt)
        wait = await service.estimate_wait(request, intake.member_id)
        total = round(sum(job.cost for job in requests), 3)
        cost = cost_text(request)
        if len(requests) > 1:
            cost += f" a job, {units_phrase(total)} for all {len(requests)}"
        cost += f"; you have used {standing_text(quota)}"
        cap = service.settings.max_request_cost
        if request.cost > cap:  # said now rather than only after Confirm
            cost += f". One request may cost at most {units_phrase(cap)}: Confirm will refuse it"
        elif quota.left is not None and not quota.allows(total):
            cost += f". You have {units_phrase(quota.left)} left: Confirm will refuse it"
        lines = [
            "**Dry run**: nothing is queued until you press Confirm.",
            *dry_run_lines(service, prepared.parsed, requests),
            f"Seeds {', '.join(map(str, request.seeds))} · {request.steps} steps · guidance "
            f"{request.guidance:g} · {request.width}×{request.height} · {request.scheduler}",
            f"Model {request.model}"
            + (f" · LoRAs {loras_text(request.loras)}" if request.loras else ""),
            f"Cost: {cost}",
            f"Ready in {eta_text(wait)} after you confirm.",
        ]
        view = ConfirmView(requests, interaction, image=prepared.image)
        if interaction.response.is_done():  # deferred (privately) while its image was read
            await interaction.edit_original_response(content="\n".join(lines), view=view)
        else:
            await interaction.response.send_message("\n".join(lines), view=view, ephemeral=True)


def dry_run_lines(
    service: ImagineService, parsed: ParsedPrompt | None, requests: list[GenerationRequest]
) -> list[str]:
    """The parsed prompt for the dry run: flags, weights, chunks and the jobs it makes."""
    lines = []
    if parsed is not None and parsed.flags.shown():
        lines.append("Flags: " + " ".join(f"`{flag[:60]}`" for flag in parsed.flags.shown()))
    first = requests[0]
    terms = weighted_terms(parse_weights(first.prompt))
    if terms:
        lines.append("Weights: " + ", ".join(terms[:10]) + (" …" if len(terms) > 10 else ""))
    if len(requests) > 1:
        lines.append(f"{len(requests)} jobs, each queued and charged on its own:")
    limit = service.settings.max_prompt_chunks
    for number, request in enumerate(requests, start=1):
        chunks, negative = prompt_chunks(service.runner, request, limit)
        label = f"{number}. " if len(requests) > 1 else "Prompt: "
        lines.append(
            f"{label}{request.prompt[:200]} · {chunks} of {limit} chunks"
            + (f" (negative {negative})" if request.negative_prompt else "")
            + f" · seed {request.seed}"
        )
    if first.negative_prompt:
        lines.append(f"Negative prompt: {first.negative_prompt[:200]}")
    return lines


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(ImagineCog(bot))
