"""The buttons under a result: Upscale ×2, Zoom Out and Pan (`OperationButton`), the 🔎
button that opens one image of several with all of them (`ToolsButton`), the admission of
those jobs (`queue_operation`, shared with the reply flags), and the layout of every button
under a result (`result_view`)."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import discord

from bot import canvas
from bot.db import jobs
from bot.requests import GenerationRequest
from bot.service import DECODE_POOL, PreparedImage
from bot.settings import Settings
from cogs.buttons import (
    ANY_VALUE,
    Persistent,
    RerollButton,
    VaryButton,
    parent_image,
    persistent_view,
    rules_of,
)
from cogs.common import refuse
from cogs.sources import raw_from_request

if TYPE_CHECKING:
    from bot.app import ImagineBot


async def queue_operation(
    bot: ImagineBot,
    origin: discord.Interaction[ImagineBot] | discord.Message,
    record: jobs.JobRecord,
    index: int,
    attachment: discord.Attachment,
    operation: str,
    *,
    guild_id: int | None,
) -> None:
    """Admit Upscale ×2, Zoom Out or Pan of image `index` of `record`'s job, from its delivered
    file `attachment`: the parent's model, prompts, LoRAs and seed, through the same desk as
    every request (bans, blocklist, quota by cost, the status message)."""
    settings, request = bot.settings, record.job.request
    try:
        chosen = canvas.plan(
            operation,
            request.width,
            request.height,
            max_side=settings.limits.max_side,
            pan_step=settings.pan_step,
        )
    except canvas.CanvasRefused as problem:
        await refuse(origin, f"{problem} Nothing was queued.")
        return
    start = partial(
        canvas.start_picture,
        parent_size=(request.width, request.height),
        chosen=chosen,
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_upload_pixels,
    )

    async def prepare(data: bytes) -> PreparedImage:
        png = await asyncio.get_running_loop().run_in_executor(DECODE_POOL, start, data)
        return PreparedImage(png, hashlib.sha256(png).hexdigest(), chosen.width, chosen.height)

    desk = bot.desk
    image = await desk.read_image(
        origin, attachment, guild_id=guild_id, prompt=request.prompt, prepare=prepare
    )
    if image is None:
        return
    raw = raw_from_request(request, bot.service.catalog)
    raw.seed, raw.count = request.seeds[index], 1
    raw.strength = operation_strength(operation, settings)
    checked = await desk.checked(origin, raw, image)
    if checked is None:
        return
    new = canvas.operation_request(checked[0], chosen, bot.service.catalog)
    await desk.admit(
        origin,
        new,
        private=checked[1],
        parent=(record.job.id, index),
        init_image=image,
        guild_id=guild_id,
    )


def operation_strength(operation: str, settings: Settings) -> float:
    """Upscale's image-to-image strength from the settings; Zoom Out and Pan validate as a
    full-strength start (they paint from noise)."""
    strengths = {
        "upscale-subtle": settings.upscale_subtle,
        "upscale-creative": settings.upscale_creative,
    }
    return strengths.get(operation, 1.0)


OPERATION_LOOKS: dict[str, tuple[str | None, str]] = {  # label, emoji
    "upscale-subtle": ("Upscale ×2 (Subtle)", "⏫"),
    "upscale-creative": ("Upscale ×2 (Creative)", "✨"),
    "zoom-1.5": ("Zoom Out ×1.5", "🔍"),
    "zoom-2": ("Zoom Out ×2", "🔭"),
    "pan-left": (None, "⬅️"),
    "pan-right": (None, "➡️"),
    "pan-up": (None, "⬆️"),
    "pan-down": (None, "⬇️"),
}
OPERATION_ROWS = {"upscale": 1, "zoom": 2, "pan": 3}


class OperationButton(
    Persistent,
    discord.ui.DynamicItem[discord.ui.Button],
    template=rf"op:(?P<job_id>{ANY_VALUE}):(?P<index>{ANY_VALUE}):(?P<operation>{ANY_VALUE})",
):
    """Upscale ×2, Zoom Out or Pan one image of a result, from the image attached to the
    message (bot/canvas.py says what each makes)."""

    WORDS: ClassVar[dict[str, tuple[str, ...]]] = {"operation": canvas.OPERATIONS}

    def __init__(self, job_id: int, index: int, operation: str) -> None:
        label, emoji = OPERATION_LOOKS[operation]
        super().__init__(
            discord.ui.Button(
                label=label,
                emoji=emoji,
                style=discord.ButtonStyle.secondary,
                custom_id=f"op:{job_id}:{index}:{operation}",
                row=OPERATION_ROWS[operation.split("-")[0]],
            )
        )
        self.job_id, self.index, self.operation = job_id, index, operation

    async def run(self, interaction: discord.Interaction[ImagineBot]) -> None:
        found = await parent_image(interaction, self.job_id, self.index)
        if found is None:
            return
        record, attachment = found
        guild_id = rules_of(record, interaction)
        await queue_operation(
            interaction.client,
            interaction,
            record,
            self.index,
            attachment,
            self.operation,
            guild_id=guild_id,
        )


class ToolsButton(
    Persistent,
    discord.ui.DynamicItem[discord.ui.Button],
    template=rf"tools:(?P<job_id>{ANY_VALUE}):(?P<index>{ANY_VALUE})",
):
    """Under a result of several images: answers privately with image `index` alone under
    every button a single image gets (Vary, Upscale, Zoom Out, Pan), as Midjourney's U
    buttons do; nothing is queued or charged."""

    def __init__(self, job_id: int, index: int) -> None:
        super().__init__(
            discord.ui.Button(
                label=f"Upscale · Zoom · Pan #{index + 1}",
                emoji="🔎",
                style=discord.ButtonStyle.secondary,
                custom_id=f"tools:{job_id}:{index}",
            )
        )
        self.job_id, self.index = job_id, index

    async def run(self, interaction: discord.Interaction[ImagineBot]) -> None:
        found = await parent_image(interaction, self.job_id, self.index)
        if found is None:
            return
        record, attachment = found
        if attachment.size > interaction.client.settings.max_upload_bytes:
            await refuse(interaction, "That image is too large to open again.")
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        data = await attachment.read()
        operations = operations_for(record.job.request, interaction.client.settings)
        await interaction.followup.send(
            f"Image #{self.index + 1} of job #{self.job_id}:",
            file=discord.File(io.BytesIO(data), attachment.filename),
            view=tools_view(self.job_id, self.index, operations),
            ephemeral=True,
        )


def operations_for(request: GenerationRequest, settings: Settings) -> tuple[str, ...]:
    """The operations an image of `request` may take: those that stay within MAX_SIZE."""
    limits = settings.limits
    return tuple(
        canvas.available(
            request.width, request.height, max_side=limits.max_side, pan_step=settings.pan_step
        )
    )


def tools_view(
    job_id: int, index: int, operations: Sequence[str], *, reroll: bool = False
) -> discord.ui.View:
    """Every button of a single image: Vary (Subtle, Strong) on row 0, Upscale ×2 on row 1,
    Zoom Out on row 2, Pan on row 3 (each only where the result stays within MAX_SIZE) and
    Reroll on row 4."""
    varies = [VaryButton(job_id, index, kind) for kind in ("subtle", "strong")]
    for button in varies:
        button.row = 0
    tools = [OperationButton(job_id, index, operation) for operation in operations]
    return persistent_view(*varies, *tools, *([RerollButton(job_id)] if reroll else []))


def result_view(
    job_id: int, indexes: list[int], *, reroll: bool = True, operations: Sequence[str] = ()
) -> discord.ui.View | None:
    """The buttons under a message of a result (one Reroll per result, on its first message).

    Discord allows five rows of five buttons, and an image has ten (Vary ×2, Upscale ×2,
    Zoom Out ×2, Pan ×4), so only a message with one image shows them all (`tools_view`).
    A message with several shows, per image, its Vary pair and a 🔎 button that answers
    privately with that image alone under all ten (`ToolsButton`: one more click, like
    Midjourney's U buttons): up to four images a row each; from five on only the 🔎 buttons,
    five a row, since the opened image carries its Vary buttons too. `operations` are those
    the images' size allows (`operations_for`)."""
    if not indexes:
        return None
    reroll_button = [RerollButton(job_id)] if reroll else []
    if len(indexes) == 1:
        return tools_view(job_id, indexes[0], operations, reroll=reroll)
    if len(indexes) <= 4:
        per_image: list[discord.ui.Item] = []
        for row, index in enumerate(indexes):
            buttons = [VaryButton(job_id, index, kind) for kind in ("subtle", "strong")]
            for button in [*buttons, ToolsButton(job_id, index)]:
                button.row = row
                per_image.append(button)
        return persistent_view(*per_image, *reroll_button)
    opens = [ToolsButton(job_id, index) for index in indexes]
    for number, button in enumerate(opens):
        button.row = number // 5
    return persistent_view(*opens, *reroll_button)


RESULT_BUTTONS = (OperationButton, ToolsButton)
