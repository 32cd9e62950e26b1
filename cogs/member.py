"""A member's own corner: /quota, /history and /forget-me. Every answer is private."""

from __future__ import annotations

import re

import discord
from discord import app_commands
from discord.ext import commands

from bot.service import ImagineService
from cogs.common import relative_time, role_ids


def jump_url(guild_id: int | None, channel_id: int | None, message_id: int | None) -> str | None:
    if channel_id is None or message_id is None:
        return None
    return f"https://discord.com/channels/{guild_id or '@me'}/{channel_id}/{message_id}"


class ForgetMeButton(
    discord.ui.DynamicItem[discord.ui.Button], template=r"forget-me:(?P<member>\d+)"
):
    """The confirmation button; its custom_id names the member, so it works after a restart
    and nobody else can press it for them."""

    def __init__(self, member_id: int) -> None:
        super().__init__(
            discord.ui.Button(
                label="Delete my prompts",
                style=discord.ButtonStyle.danger,
                custom_id=f"forget-me:{member_id}",
            )
        )
        self.member_id = member_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Button, match: re.Match[str]
    ) -> ForgetMeButton:
        return cls(int(match["member"]))

    async def callback(self, interaction: discord.Interaction) -> None:
        if interaction.user.id != self.member_id:
            await interaction.response.send_message(
                "This button belongs to someone else.", ephemeral=True
            )
            return
        deleted = await interaction.client.service.store.forget_member(self.member_id)
        if deleted < 0:
            text = "One of your jobs is running right now; try again when it has finished."
        else:
            text = (
                f"Done: deleted {deleted} job(s) with their prompts and parameters. "
                "Your quota counts are kept, without any text."
            )
        await interaction.response.edit_message(content=text, view=None)


class MemberCog(commands.Cog):
    def __init__(self, bot: commands.Bot, service: ImagineService) -> None:
        self.bot = bot
        self.service = service

    @app_commands.command(name="quota", description="How many images you have left today")
    async def quota(self, interaction: discord.Interaction) -> None:
        status = await self.service.quota(
            interaction.guild_id,
            interaction.user.id,
            exempt=self.service.is_exempt(role_ids(interaction.user)),
        )
        if status.unlimited:
            text = f"You have no image limit here. You made {status.used} in the last 24 hours."
        else:
            text = f"You have used {status.used} of {status.limit} images in the last 24 hours; "
            text += f"{status.left} left."
            if status.next_free_at is not None:
                text += f" The next image frees up {relative_time(status.next_free_at)}."
        await interaction.response.send_message(text, ephemeral=True)

    @app_commands.command(name="history", description="Your last 10 jobs")
    async def history(self, interaction: discord.Interaction) -> None:
        records = await self.service.store.history(interaction.user.id, limit=10)
        if not records:
            await interaction.response.send_message("You have no jobs yet.", ephemeral=True)
            return
        lines = []
        for record in records:
            request = record.job.request
            link = jump_url(record.job.guild_id, record.result_channel_id, record.result_message_id)
            where = f" [result]({link})" if link else ""
            lines.append(
                f"**#{record.job.id}** {relative_time(record.job.queued_at)} · {record.job.status}"
                f" · seed {request.seed} · {request.steps} steps · {request.width}×{request.height}"
                f" · {request.scheduler}{where}\n> {request.prompt[:150]}"
            )
        await interaction.response.send_message("\n".join(lines)[:2000], ephemeral=True)

    @app_commands.command(
        name="forget-me", description="Delete your prompts and job parameters from the bot"
    )
    async def forget_me(self, interaction: discord.Interaction) -> None:
        view = discord.ui.View(timeout=None)
        view.add_item(ForgetMeButton(interaction.user.id))
        await interaction.response.send_message(
            "This deletes every prompt and job parameter the bot keeps for you, on every server. "
            "Posted images stay in their channels. Press the button to confirm.",
            view=view,
            ephemeral=True,
        )


async def setup(bot: commands.Bot) -> None:
    bot.add_dynamic_items(ForgetMeButton)
    await bot.add_cog(MemberCog(bot, bot.service))
