"""A member's own corner: /quota, /history, /forget-me and their /settings for /imagine.
Every answer is private."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import discord
from discord import app_commands
from discord.ext import commands

from bot import operations
from bot.db import admission, members
from bot.db.members import MemberDefaults
from bot.intake import quota_exempt
from bot.models import MAX_NAME_CHARS
from bot.quota import units_phrase
from bot.requests import ALL_SCHEDULERS
from cogs.buttons import forget_me_view
from cogs.common import frees_up_text, relative_time, role_ids, server_only, standing_text
from cogs.models import age_restricted, model_choices

if TYPE_CHECKING:
    from bot.app import ImagineBot


def jump_url(guild_id: int | None, channel_id: int | None, message_id: int | None) -> str | None:
    if channel_id is None or message_id is None:
        return None
    return f"https://discord.com/channels/{guild_id or '@me'}/{channel_id}/{message_id}"


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
            ("model", defaults.model),
        )
        if value is not None
    ]
    where = "privately (only you see them)" if defaults.private else "in the channel"
    listed = "; ".join(shown) if shown else "none (the server's defaults apply)"
    return f"Your defaults: {listed}. Results are delivered {where}."


class MemberCog(commands.Cog):
    def __init__(self, bot: ImagineBot) -> None:
        self.bot = bot

    @app_commands.command(name="quota", description="How many cost units you have left today")
    @app_commands.guild_only()
    @server_only
    async def quota(self, interaction: discord.Interaction[ImagineBot]) -> None:
        """Units used and left, when they free up, jobs queued and the cap per request."""
        service, settings = self.bot.service, self.bot.settings
        status = await service.quota(
            interaction.guild_id,
            interaction.user.id,
            exempt=quota_exempt(settings, role_ids(interaction.user)),
        )
        active = await self.bot.store.read(admission.active_jobs, interaction.user.id)
        lines = [f"You have used {standing_text(status)}."]
        if status.left is not None:
            lines[0] += f" {units_phrase(status.left)} left.{frees_up_text(status)}"
        cap = units_phrase(settings.max_request_cost)
        lines.append(
            "A 512×512 image at 25 steps costs 1 unit; more images, pixels or steps cost "
            f"proportionally. One request may cost at most {cap}."
        )
        if settings.max_queued_per_member:
            lines.append(
                f"Jobs queued or running: {active} of at most {settings.max_queued_per_member}."
            )
        await interaction.response.send_message("\n".join(lines), ephemeral=True)

    @app_commands.command(name="history", description="Your last 10 jobs")
    async def history(self, interaction: discord.Interaction[ImagineBot]) -> None:
        records = await self.bot.store.read(members.history, interaction.user.id, limit=10)
        if not records:
            await interaction.response.send_message("You have no jobs yet.", ephemeral=True)
            return
        lines = []
        for record in records:
            request = record.job.request
            link = jump_url(record.job.guild_id, record.result_channel_id, record.result_message_id)
            where = f" [result]({link})" if link else ""
            made = "" if request.operation is None else f" · {operations.label(request.operation)}"
            lines.append(
                f"**#{record.job.id}** {relative_time(record.job.queued_at)} · {record.job.status}"
                f"{made} · seed {request.seed} · {request.steps} steps · "
                f"{request.width}×{request.height} · {request.scheduler}{where}\n"
                f"> {request.prompt[:150]}"
            )
        await interaction.response.send_message("\n".join(lines)[:2000], ephemeral=True)

    @app_commands.command(
        name="forget-me", description="Delete your prompts and job parameters from the bot"
    )
    async def forget_me(self, interaction: discord.Interaction[ImagineBot]) -> None:
        await interaction.response.send_message(
            "This deletes every prompt and job parameter the bot keeps for you, on every server. "
            "Posted images stay in their channels. Press the button to confirm.",
            view=forget_me_view(interaction.user.id),
            ephemeral=True,
        )

    @app_commands.command(name="settings", description="Your defaults for /imagine")
    @app_commands.describe(
        steps="Default steps",
        width="Default width in pixels",
        height="Default height in pixels",
        scheduler="Default sampling method",
        negative_prompt="Default negative prompt",
        count="Default number of images",
        private="Deliver your results only to you",
        model="Default model, from the server's models (see /models)",
        reset="Forget all your defaults",
    )
    @app_commands.choices(scheduler=[app_commands.Choice(name=n, value=n) for n in ALL_SCHEDULERS])
    async def settings_command(
        self,
        interaction: discord.Interaction[ImagineBot],
        steps: int | None = None,
        width: int | None = None,
        height: int | None = None,
        scheduler: str | None = None,
        negative_prompt: str | None = None,
        count: int | None = None,
        private: bool | None = None,
        model: app_commands.Range[str, 1, MAX_NAME_CHARS] | None = None,
        reset: bool | None = None,
    ) -> None:
        """Save the member's defaults after the same checks /imagine makes."""
        store = self.bot.store
        member_id = interaction.user.id
        current = MemberDefaults() if reset else await store.read(members.defaults, member_id)
        chosen = {
            "steps": steps,
            "width": width,
            "height": height,
            "scheduler": scheduler,
            "negative_prompt": negative_prompt,
            "count": count,
            "private": private,
            "model": model[:MAX_NAME_CHARS].strip() if model else None,
        }
        wanted = replace(current, **{k: v for k, v in chosen.items() if v is not None})
        self.bot.service.check_defaults(wanted)  # refused through the funnel
        await store.write(members.set_defaults, member_id, wanted)
        await interaction.response.send_message(defaults_text(wanted), ephemeral=True)

    @settings_command.autocomplete("model")
    async def model_autocomplete(
        self, interaction: discord.Interaction[ImagineBot], typed: str
    ) -> list[app_commands.Choice[str]]:
        here = age_restricted(interaction.channel)
        return model_choices(self.bot.service.catalog, typed, age_restricted=here)


async def setup(bot: ImagineBot) -> None:
    await bot.add_cog(MemberCog(bot))
