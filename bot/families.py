"""Model families as the core knows them, without torch: what a model's model_index.json says
it is, which schedulers and prompt syntax apply to it, and its name for members.

bot/pipelines/loading.py picks the pipeline class from the same `_class_name`; the catalog
learns each allowlisted model's family at start-up (`model_family`), so validation can refuse
what a family cannot run before anything is queued.
"""

from __future__ import annotations

import json
from pathlib import Path

from bot.downloads import MODEL_INDEX, TINY_MODEL, cached_model, looks_like_path

# A model's family by the `_class_name` of its model_index.json.
FAMILY_OF_CLASS: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": "sd",
    "LatentConsistencyModelPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLInpaintPipeline": "sdxl",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
    "FluxInpaintPipeline": "flux",
}
# What members read in /models.
FAMILY_NAMES: dict[str, str] = {"sd": "SD 1.x/2.x", "sdxl": "SDXL", "flux": "FLUX.1"}
# Flow-matching families: their own schedulers, no classifier-free pass.
FLOW_FAMILIES = frozenset({"flux"})
# Scheduler names a member understands, in the order shown in Discord's choice list: the UNet
# families' (SD 1.x/2.x, SDXL), then the flow models' (`ALL_SCHEDULERS`).
SCHEDULERS: tuple[str, ...] = (
    "DPM++ 2M",
    "Euler a",
    "Euler",
    "DDIM",
    "PNDM",
    "LMS",
    "UniPC",
    "LCM",
)
DEFAULT_SCHEDULER = "DPM++ 2M"
FLOW_SCHEDULERS: tuple[str, ...] = ("Flow Euler",)
ALL_SCHEDULERS: tuple[str, ...] = SCHEDULERS + FLOW_SCHEDULERS
# The side of a latent patch in pixels, where it is more than SD's 8: FLUX packs 2×2 latents.
SIZE_STEPS: dict[str, int] = {"flux": 16}
# Families whose prompt encoding takes AUTOMATIC1111 weights and BREAK.
WEIGHTED_FAMILIES = frozenset({"sd", "sdxl"})

# The built-in sources' families, known before they are first built.
BUILTIN_FAMILIES: dict[str, str] = {
    TINY_MODEL: "sd",
    "tiny-sdxl": "sdxl",
    "tiny-inpaint": "sd",
    "tiny-flux": "flux",
}


def model_family(source: str, cache_dir: Path, revision: str | None = None) -> str | None:
    """The family of a model source (a built-in, a local folder, a cached Hub snapshot) from
    its model_index.json; None when it is not on this machine or not a known class."""
    if source in BUILTIN_FAMILIES:
        return BUILTIN_FAMILIES[source]
    if looks_like_path(source):
        folder: Path | None = Path(source).expanduser()
    else:
        folder = cached_model(source, cache_dir, revision)
    index = None if folder is None else folder / MODEL_INDEX
    if index is None or not index.is_file():
        return None
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return FAMILY_OF_CLASS.get(name) if isinstance(name, str) else None


def schedulers_for(family: str | None) -> tuple[str, ...]:
    """The schedulers a model of `family` runs with (None: unknown, loaded as SD)."""
    return FLOW_SCHEDULERS if family in FLOW_FAMILIES else SCHEDULERS


def family_name(family: str | None) -> str:
    """The family as members read it; an unknown one as SD, which is what loads it."""
    return FAMILY_NAMES.get(family or "sd", family or "SD")
