"""What a result message carries: the PNGs of its images (a grid first when there are
several; spoilers where cogs/delivery.py shows flagged images), the headline and the embed of
parameters that reproduce them, packed into messages within Discord's file and size limits."""

from __future__ import annotations

import io
from dataclasses import dataclass

import discord

from bot import operations
from bot.handoff import JobResult
from bot.images import grid, parameters_text, png_bytes
from bot.requests import GenerationRequest, Job
from cogs.common import loras_text

MAX_FILES = 10  # Discord's attachments per message


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
    if request.loras:
        embed.add_field(name="LoRAs", value=loras_text(request.loras)[:1024])
    if request.strength is not None:
        embed.add_field(name="Strength", value=f"{request.strength:g} (from an image)")
    if request.operation is not None:
        embed.add_field(name="Made with", value=operations.label(request.operation))
    if seconds is not None:
        embed.set_footer(text=f"Generated in {seconds:.1f} s")
    return embed


@dataclass(frozen=True)
class Upload:
    """One file of a result: an image (`index` in the request) or the grid (`index` None);
    a `spoiler` is blurred until clicked (Discord's SPOILER_ file name)."""

    filename: str
    data: bytes
    index: int | None = None
    spoiler: bool = False

    def file(self) -> discord.File:
        return discord.File(io.BytesIO(self.data), self.filename, spoiler=self.spoiler)


def result_uploads(
    request: GenerationRequest, result: JobResult, spoilers: frozenset[int] = frozenset()
) -> list[Upload]:
    """PNGs of the images not withheld, a grid first when there are several; the images
    `spoilers` (by index) and a grid showing one of them as spoilers. Runs in a thread:
    encoding big grids is slow."""
    kept = [index for index, generated in enumerate(result.images) if not generated.withheld]
    uploads = []
    if len(kept) > 1:
        sheet = grid([result.images[index].image for index in kept])
        uploads.append(Upload("grid.png", png_bytes(sheet), spoiler=bool(spoilers)))
    for index in kept:
        seed = request.seeds[index]
        data = png_bytes(result.images[index].image, parameters_text(request, seed))
        uploads.append(Upload(f"seed-{seed}.png", data, index, index in spoilers))
    return uploads


def headline(job: Job, withheld: int, spoilers: int) -> str:
    """The first lines of a result: whom it is for, and what the safety checker flagged."""
    count = job.request.count
    lines = [f"<@{job.member_id}> job #{job.id}"]
    if spoilers:
        lines.append(f"{spoilers} of {count} image(s) flagged by the safety checker, as spoilers.")
    if withheld:
        lines.append(f"{withheld} of {count} image(s) withheld by the safety checker.")
        if withheld == count:
            lines.append("They were refunded.")
    return "\n".join(lines)


def pack(uploads: list[Upload], limit: int) -> list[list[Upload]] | None:
    """The uploads as messages Discord accepts: at most 10 files and `limit` bytes each. All
    in one message, grid included, when that fits; else the images alone, in order, over as
    many messages as needed. None when one image alone is over the limit."""
    if len(uploads) <= MAX_FILES and sum(len(u.data) for u in uploads) <= limit:
        return [uploads]
    images = [upload for upload in uploads if upload.index is not None]
    if any(len(upload.data) > limit for upload in images):
        return None
    parts: list[list[Upload]] = [[]]
    for upload in images:
        part = parts[-1]
        if part and (
            len(part) == MAX_FILES or sum(len(u.data) for u in part) + len(upload.data) > limit
        ):
            parts.append(part := [])
        part.append(upload)
    return parts


def split(part: list[Upload]) -> list[list[Upload]] | None:
    """After Discord refused `part` as too large: the images without the grid, else in
    halves; None for a lone image."""
    images = [upload for upload in part if upload.index is not None]
    if images and len(images) < len(part):
        return [images]
    if len(images) > 1:
        half = len(images) // 2
        return [images[:half], images[half:]]
    return None


def too_large(error: discord.HTTPException) -> bool:
    """Discord's 413 (or its 40005 code): the files were over the upload limit."""
    return error.status == 413 or error.code == 40005
