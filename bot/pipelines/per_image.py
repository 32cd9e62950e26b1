"""What else may differ per image inside one diffusers call: the guidance scale, and for
image-to-image any strength that starts at the same step.

diffusers' Stable Diffusion pipelines take one `guidance_scale` per call. The pipeline classes
here keep diffusers' `__call__`, scheduler steps included, and change only the two properties
it reads the scale through, so a batch mixing scales computes for each image what a call of
that image alone computes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline


class PerImageGuidance:
    """Mixed in before a diffusers Stable Diffusion pipeline class: `guided_call` runs its
    `__call__` with one guidance scale per image. No `__init__`: diffusers reads the pipeline's
    components from the signature of the class it mixes into."""

    # Set by `guided_call` for the call it runs.
    _scales: tuple[float, ...] = ()
    _scale_tensor: torch.Tensor | None = None
    _cfg: bool = True

    def guided_call(self, scales: Sequence[float], cfg: bool, **kwargs: Any) -> Any:
        """Call the pipeline with `scales[i]` guiding image i; `cfg` (the batch key's) says
        whether they run classifier-free guidance, which a scale above 1 does, as in diffusers."""
        if any((scale > 1) != cfg for scale in scales):
            raise ValueError(
                f"guidance scales {list(scales)} do not all run classifier-free guidance as the "
                f"batch key says (cfg={cfg}): one call takes scales above 1 or none."
            )
        self._scales = tuple(scales)
        self._cfg = cfg
        # Built once per call, on the device and in the dtype of the noise it multiplies.
        self._scale_tensor = torch.tensor(
            self._scales, dtype=self.unet.dtype, device=self.unet.device
        )
        # `guidance_scale` is left at diffusers' default: it is only stored, and the properties
        # below answer in its place.
        return self(**kwargs)

    @property
    def do_classifier_free_guidance(self) -> bool:
        # diffusers asks `guidance_scale > 1`, which a tensor of scales cannot answer; the key
        # did. UNets with a guidance embedding (LCM) never run it, as in diffusers.
        return self._cfg and self.unet.config.time_cond_proj_dim is None

    @property
    def guidance_scale(self) -> torch.Tensor | float:
        if self.unet.config.time_cond_proj_dim is not None:
            # There the scale only enters as an embedding, built from this one number and
            # then replaced by each image's own in `get_guidance_scale_embedding`.
            return self._scales[0]
        # diffusers guides with `uncond + guidance_scale * (text - uncond)`, where uncond and
        # text are the two (batch, C, H, W) halves of the doubled batch: (batch, 1, 1, 1)
        # scales each image's noise by its own number.
        assert self._scale_tensor is not None, "guidance_scale is read inside guided_call"
        return self._scale_tensor.view(-1, 1, 1, 1)

    def get_guidance_scale_embedding(
        self, w: torch.Tensor, embedding_dim: int = 512, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        # diffusers passes the one scale minus 1, repeated per image; each image's own, built
        # the same way (a Python float minus 1, then float32), takes its place.
        own = torch.tensor([scale - 1 for scale in self._scales]).to(w.device)
        if own.shape != w.shape:
            raise ValueError(f"{len(self._scales)} guidance scales for {w.shape[0]} images")
        return super().get_guidance_scale_embedding(own, embedding_dim, dtype)


class GuidedText2Image(PerImageGuidance, StableDiffusionPipeline):
    """Text-to-image with a guidance scale per image."""


class GuidedImage2Image(PerImageGuidance, StableDiffusionImg2ImgPipeline):
    """Image-to-image with a guidance scale per image."""


def strength_for(steps: int, image_steps: int) -> float:
    """A strength for which diffusers' img2img denoises exactly the last `image_steps` of
    `steps`. It computes min(int(steps × strength), steps) and nothing else from the strength;
    image_steps / steps can land just below a whole number (15 / 22 × 22 < 15), the middle of
    the interval cannot."""
    if not 1 <= image_steps <= steps:
        raise ValueError(
            f"mode 'image' denoises from 1 to {steps} steps from the init image, got {image_steps}."
        )
    return 1.0 if image_steps == steps else (image_steps + 0.5) / steps
