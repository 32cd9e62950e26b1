"""What one diffusers call hands back, and the signal that a call was stopped early.

Torch-free on purpose: the executor matches these by type without importing the pipelines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import PIL.Image

# What a member reads when the VAE gave NaN even in float32 (an fp16 overflow that stuck).
BLANK_IMAGE_ERROR = "the image came out blank (NaN); try another seed or fewer steps"


@dataclass
class GeneratedImage:
    """One output image; `withheld` images were flagged by the safety checker and must not be
    delivered (blacked out, unless NSFW_CHANNELS=allow kept their pixels: delivery then shows
    them as spoilers in an age-restricted channel, and clears `withheld`, so they are charged).
    `error` says why an image is unusable."""

    image: PIL.Image.Image
    withheld: bool
    error: str | None = None


class Interrupted(RuntimeError):
    """A call stopped early on request; its images are not to be used."""


# The runner's step callback: (steps done, steps in all, a rough preview per image or None),
# called from the device thread after each denoising step of a call.
RunnerProgress = Callable[[int, int, list[PIL.Image.Image] | None], None]
