"""The buttons under a result: Upscale ×2, Zoom Out and Pan (`OperationButton`), the 🔎
button that opens one image of several with all of them (`OpenImageButton`), the admission of
those jobs (`operation_ask`, shared with the reply flags), and the layout of every button
under a result (`result_view`)."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import discord

from bot import operations
from bot.requests import GenerationRequest
from bot.settings import Settings
from bot.uploads import DECODE_POOL, PreparedImage
from cogs.buttons import (
    ANY_VALUE,
    Persistent,
    RerollButton,
    VaryButton,
    parent_image,
    persistent_view,
)
from cogs.common import Refused
from cogs.entry import Ask
from cogs.sources import raw_from_request

if TYPE_CHECKING:
    from bot.app import ImagineBot


def operation_ask(
    bot: ImagineBot,
    request: GenerationRequest,
    index: int,
    image: discord.Attachment,
    operation: str,
) -> Ask:
    """Upscale ×2, Zoom Out or Pan of image `index` of `request`, from its delivered file
    `image`: the parent's model, prompts, LoRAs and seed, on the start picture the operation
    makes (bot/operations.py). OperationRefused when the result would pass MAX_SIZE."""
    settings = bot.settings
    chosen = operations.plan(
        operation,
        request.width,
        request.height,
        max_side=settings.limits.max_side,
        pan_step=settings.pan_step,
    )
    start = partial(
        operations.start_picture,
        parent_size=(request.width, request.height),
        chosen=chosen,
        max_bytes=settings.max_upload_bytes,
        max_pixels=settings.max_upload_pixels,
    )

    async def prepare(data: bytes) -> PreparedImage:
        png = await asyncio.get_running_loop().run_in_executor(DECODE_POOL, start, data)
        return PreparedImage(png, hashlib.sha256(png).hexdigest(), chosen.width, chosen.height)

    catalog = bot.service.catalog
    options = raw_from_request(request, catalog)
    options.seed, options.count = request.seeds[index], 1
    return Ask(
        options,
        image=image,
        prepare=prepare,
        strength=operation_strength(operation, settings),
        derive=partial(operations.operation_request, chosen=chosen, catalog=catalog),
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
    message (bot/operations.py says what each makes)."""

    WORDS: ClassVar[dict[str, tuple[str, ...]]] = {"operation": operations.OPERATIONS}

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
        bot = interaction.client
        record, attachment = await parent_image(interaction, self.job_id, self.index)
        entry = await bot.desk.entry(interaction, record.job, self.index)
        ask = operation_ask(bot, record.job.request, self.index, attachment, self.operation)
        await bot.desk.admit(entry, ask)


class OpenImageButton(
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
        record, attachment = await parent_image(interaction, self.job_id, self.index)
        if attachment.size > interaction.client.settings.max_upload_bytes:
            raise Refused("That image is too large to open again.")
        await interaction.response.defer(ephemeral=True, thinking=True)
        data = await attachment.read()
        offered = operations_for(record.job.request, interaction.client.settings)
        await interaction.followup.send(
            f"Image #{self.index + 1} of job #{self.job_id}:",
            file=discord.File(io.BytesIO(data), attachment.filename),
            view=single_image_view(self.job_id, self.index, offered),
            ephemeral=True,
        )


def operations_for(request: GenerationRequest, settings: Settings) -> tuple[str, ...]:
    """The operations an image of `request` may take: those that stay within MAX_SIZE."""
    limits = settings.limits
    return tuple(
        operations.available(
            request.width, request.height, max_side=limits.max_side, pan_step=settings.pan_step
        )
    )


def single_image_view(
    job_id: int, index: int, offered: Sequence[str], *, reroll: bool = False
) -> discord.ui.View:
    """Every button of a single image: Vary (Subtle, Strong) on row 0, Upscale ×2 on row 1,
    Zoom Out on row 2, Pan on row 3 (each only where the result stays within MAX_SIZE) and
    Reroll on row 4."""
    varies = [VaryButton(job_id, index, kind) for kind in ("subtle", "strong")]
    for button in varies:
        button.row = 0
    tools = [OperationButton(job_id, index, operation) for operation in offered]
    return persistent_view(*varies, *tools, *([RerollButton(job_id)] if reroll else []))


def result_view(
    job_id: int, indexes: list[int], *, reroll: bool = True, offered: Sequence[str] = ()
) -> discord.ui.View | None:
    """The buttons under a message of a result (one Reroll per result, on its first message).

    Discord allows five rows of five buttons, and an image has ten (Vary ×2, Upscale ×2,
    Zoom Out ×2, Pan ×4), so only a message with one image shows them all (`single_image_view`).
    A message with several shows, per image, its Vary pair and a 🔎 button that answers
    privately with that image alone under all ten (`OpenImageButton`: one more click, like
    Midjourney's U buttons): up to four images a row each; from five on only the 🔎 buttons,
    five a row, since the opened image carries its Vary buttons too. `offered` are the operations
    the images' size allows (`operations_for`)."""
    if not indexes:
        return None
    reroll_button = [RerollButton(job_id)] if reroll else []
    if len(indexes) == 1:
        return single_image_view(job_id, indexes[0], offered, reroll=reroll)
    if len(indexes) <= 4:
        per_image: list[discord.ui.Item] = []
        for row, index in enumerate(indexes):
            buttons = [VaryButton(job_id, index, kind) for kind in ("subtle", "strong")]
            for button in [*buttons, OpenImageButton(job_id, index)]:
                button.row = row
                per_image.append(button)
        return persistent_view(*per_image, *reroll_button)
    opens = [OpenImageButton(job_id, index) for index in indexes]
    for number, button in enumerate(opens):
        button.row = number // 5
    return persistent_view(*opens, *reroll_button)


RESULT_BUTTONS = (OperationButton, OpenImageButton)
