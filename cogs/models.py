"""/models: what a member may pick in /imagine from the owner's allowlist (bot/models.py),
which models are in memory now (a job for one of those does not wait for a load), and the
LoRAs with the models they fit; and the choices /imagine's `model:` and `lora:` autocomplete
offer. Every answer is private. Models the owner marked `nsfw` are offered only in
age-restricted channels (`age_restricted`), where alone they are admitted."""

from __future__ import annotations

from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot.families import family_name
from bot.models import MAX_LORAS_TEXT, Catalog
from bot.requests import Limits
from cogs.common import MAX_ANSWER

if TYPE_CHECKING:
    from bot.app import ImagineBot

MAX_CHOICES = 25  # Discord's most choices in one autocomplete answer
MAX_CHOICE_TEXT = 100  # Discord's longest choice name, and string choice value
# Of what a member typed, the part autocomplete reads: no name or LoRA list is longer.
MAX_TYPED = MAX_LORAS_TEXT


def age_restricted(channel: object) -> bool:
    """Whether Discord marks `channel` age-restricted: a thread is when its parent channel is
    (discord.py's `Thread.is_nsfw`); a DM, or a channel the bot does not know, is not."""
    is_nsfw = getattr(channel, "is_nsfw", None)  # DMs and partial channels have none
    return callable(is_nsfw) and bool(is_nsfw())


def _short(text: str, limit: int = MAX_CHOICE_TEXT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _matches(typed: str, name: str, description: str) -> tuple[bool, str] | None:
    """Sort key for a match of `typed` (lower case) in a name or description: names that
    start with it first, then by name; None when it does not match at all."""
    lower = name.lower()
    if typed in lower or typed in description.lower():
        return (not lower.startswith(typed), lower)
    return None


def model_choices(
    catalog: Catalog, typed: str, *, age_restricted: bool = False
) -> list[app_commands.Choice[str]]:
    """Allowlisted models whose name or description holds what the member typed, the default
    first, then names that start with it; at most 25 (Discord's limit). `nsfw` models only in
    an age-restricted channel."""
    needle = typed[:MAX_TYPED].strip().lower()
    found = []
    for entry in catalog.usable_models():
        name = entry.name
        key = _matches(needle, name, entry.description)
        if key is not None and (age_restricted or not entry.nsfw):
            found.append((name != catalog.default, *key, name, entry.description))
    found.sort()
    return [
        app_commands.Choice(name=_short(f"{name} — {text}" if text else name), value=name)
        for *_, name, text in found[:MAX_CHOICES]
    ]


def lora_choices(catalog: Catalog, model: str | None, typed: str) -> list[app_commands.Choice[str]]:
    """The member's `lora:` text with its last word completed to each LoRA that fits the
    model chosen (or the default) and is not listed yet, as `name:weight` (weight 1 unless
    typed); at most 25. An unknown model fits no LoRA: validation will name the models."""
    if model is not None and model not in catalog.models:
        return []
    model = model or catalog.default
    typed = typed[:MAX_TYPED]
    words = typed.split()
    partial = "" if not words or typed[-1:].isspace() else words.pop()
    name_part, _, weight = partial.partition(":")
    listed = {word.partition(":")[0] for word in words}
    found = []
    for lora in catalog.loras_for(model):
        name = lora.name
        key = _matches(name_part.lower(), name, lora.description)
        value = " ".join([*words, f"{name}:{weight or 1}"])
        if key is not None and name not in listed and len(value) <= MAX_CHOICE_TEXT:
            label = f"{value} — {lora.description}" if lora.description else value
            found.append((*key, value, label))
    found.sort()
    return [
        app_commands.Choice(name=_short(label), value=value)
        for *_, value, label in found[:MAX_CHOICES]
    ]


def defaults_line(catalog: Catalog, name: str, base: Limits) -> str:
    """A model's defaults and limits as /imagine applies them."""
    entry, limits = catalog.models[name], catalog.limits_for(name, base)
    family = [family_name(entry.family)] if entry.family else []  # known once it is here
    parts = [
        *family,
        f"{limits.default_steps} steps (at most {limits.max_steps})",
        f"guidance {limits.default_guidance:g}",
        f"{limits.default_width}×{limits.default_height}",
        limits.default_scheduler,
    ]
    if entry.negative_prompt:
        parts.append(f"negative prompt “{_short(entry.negative_prompt, 60)}”")
    return " · ".join(parts)


def models_text(
    catalog: Catalog, base: Limits, loaded: frozenset[str], *, age_restricted: bool = False
) -> str:
    """The /models answer, cut at whole lines to fit one message; `nsfw` models only in an
    age-restricted channel."""
    lines = [f"**Models** (pick one with `/imagine model:`; the default is **{catalog.default}**)"]
    for name, entry in catalog.models.items():
        if entry.nsfw and not age_restricted:
            continue
        state = (
            "not installed yet"
            if entry.source in catalog.missing
            else "loaded now"
            if name in loaded
            else "loads when first used"
        )
        about = f" — {_short(entry.description, 120)}" if entry.description else ""
        lines.append(f"• **{name}**{about} · {state}\n  {defaults_line(catalog, name, base)}")
    if catalog.loras:
        lines.append(
            "**LoRAs** (add them with `/imagine lora:name:weight`, weights from −2 to 2, "
            "several separated by spaces)"
        )
        for name, lora in catalog.loras.items():
            about = f" — {_short(lora.description, 120)}" if lora.description else ""
            state = " · not installed yet" if lora.source in catalog.missing else ""
            lines.append(f"• **{name}**{about} · for {', '.join(lora.models)}{state}")
    else:
        lines.append("No LoRAs are available.")
    text, shown = "", 0
    for line in lines:
        if len(text) + len(line) + 40 > MAX_ANSWER:
            return text + f"… and {len(lines) - shown} more."
        text, shown = text + line + "\n", shown + 1
    return text.rstrip()


class ModelsCog(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot

    @app_commands.command(
        name="models", description="The models and LoRAs you can use, and which are loaded"
    )
    async def models(self, interaction: discord.Interaction[ImagineBot]) -> None:
        service = self.bot.service
        # Loaded on any worker (the local thread, or each Ray actor): its own snapshot.
        loaded = service.resident_models()
        text = models_text(
            service.catalog,
            service.settings.limits,
            loaded,
            age_restricted=age_restricted(interaction.channel),
        )
        await interaction.response.send_message(text, ephemeral=True)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(ModelsCog(bot))
