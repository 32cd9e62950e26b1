"""What a variation or a reroll starts from: the image attached to a message, and the options
of the earlier job or of the PNG's own parameters."""

from __future__ import annotations

import discord

from bot import operations
from bot.models import Catalog
from bot.requests import ALL_SCHEDULERS, GenerationRequest, RawOptions

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Discord shows a file whose name starts with this as a spoiler: how an image the safety
# checker flagged is posted in an age-restricted channel (NSFW_CHANNELS=allow).
SPOILER = "SPOILER_"


def image_attachment(
    message: discord.Message, name: str | None = None
) -> discord.Attachment | None:
    """The attachment called `name` (or shown as a spoiler), else the first one that looks
    like an image (its bytes are checked later: a name or a content type proves nothing)."""
    for attachment in message.attachments:
        if name is not None:
            if attachment.filename.removeprefix(SPOILER) == name:
                return attachment
            continue
        content_type = attachment.content_type or ""
        if content_type.startswith("image/") or attachment.filename.lower().endswith(
            IMAGE_SUFFIXES
        ):
            return attachment
    return None


def raw_from_request(request: GenerationRequest, catalog: Catalog) -> RawOptions:
    """The options to ask again for what an earlier job asked, with its LoRAs, on the model it
    draws with (for a Zoom Out or Pan painted by a fill-only model, the model it paints for)."""
    return RawOptions(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        steps=request.steps,
        guidance=request.guidance,
        scheduler=request.scheduler,
        model=operations.drawing_model(request, catalog),
        loras=request.loras,
    )


def raw_from_parameters(parameters: dict, catalog: Catalog) -> RawOptions:
    """Options read from a PNG's A1111 `parameters`. What this server does not have is
    dropped rather than refused (the PNG may come from another tool): a sampler, a model
    outside the allowlist (the default draws instead), LoRAs that do not fit the model. A
    fill-only model (the allowlist's `inpaint`) gives way to the model it paints for."""
    sampler, model = parameters.get("sampler"), parameters.get("model")
    if model in catalog.fill_only:  # a Zoom Out or Pan: the model it painted for draws
        model = next(m.name for m in catalog.models.values() if m.inpaint == model)
    if model not in catalog.models:
        model = None
    drawn_by = model or catalog.default
    loras = tuple(
        (name, weight)
        for name, weight in parameters.get("loras") or ()
        if name in catalog.loras and drawn_by in catalog.loras[name].models
    )
    return RawOptions(
        prompt=parameters.get("prompt"),
        negative_prompt=parameters.get("negative_prompt"),
        steps=parameters.get("steps"),
        guidance=parameters.get("cfg_scale"),
        scheduler=sampler if sampler in ALL_SCHEDULERS else None,
        model=model,
        loras=loras or None,
    )
