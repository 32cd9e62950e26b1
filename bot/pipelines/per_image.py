"""What else may differ per image inside one diffusers call: the guidance scale, and for
image-to-image any strength that starts at the same step.

diffusers' Stable Diffusion pipelines (SD 1.x/2.x and SDXL alike) take one `guidance_scale` per
call. The pipeline classes here keep diffusers' `__call__`, scheduler steps included, and
change only the two properties it reads the scale through, so a batch mixing scales computes
for each image what a call of that image alone computes. SDXL's extra conditioning (pooled
embeddings, time ids from the one size a key has) is per image already.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
)

from bot.operations import paste_back, repaint_mask
from bot.pipelines.flow import FLOW_CLASSES, FlowPerImage
from bot.requests import BatchKey, ImageSpec


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


class GuidedXLText2Image(PerImageGuidance, StableDiffusionXLPipeline):
    """SDXL text-to-image with a guidance scale per image."""


class GuidedXLImage2Image(PerImageGuidance, StableDiffusionXLImg2ImgPipeline):
    """SDXL image-to-image with a guidance scale per image."""


# The class a runner mode calls, by the family of the loaded (text-to-image) pipeline.
GUIDED_CLASSES: dict[tuple[type[DiffusionPipeline], str], type[PerImageGuidance]] = {
    (StableDiffusionPipeline, "text"): GuidedText2Image,
    (StableDiffusionPipeline, "image"): GuidedImage2Image,
    (StableDiffusionXLPipeline, "text"): GuidedXLText2Image,
    (StableDiffusionXLPipeline, "image"): GuidedXLImage2Image,
}


def guided_class(base: DiffusionPipeline, mode: str) -> type[PerImageGuidance | FlowPerImage]:
    """The per-image-guidance class that runs `mode` with `base`'s modules (a UNet family's
    here, a flow family's from bot/pipelines/flow.py)."""
    classes = {**GUIDED_CLASSES, **FLOW_CLASSES}
    for (family, known_mode), cls in classes.items():
        if mode == known_mode and isinstance(base, family):
            return cls
    raise ValueError(f"no {mode!r} pipeline for a {type(base).__name__}")


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


class GuidedInpaint(PerImageGuidance, StableDiffusionInpaintPipeline):
    """Inpainting (Zoom Out, Pan) with a guidance scale per image. diffusers runs a 9-channel
    inpainting UNet with the mask and masked image as input, and a 4-channel base UNet by
    putting the kept latents back after every step; both keep one generator per image."""


class GuidedXLInpaint(PerImageGuidance, StableDiffusionXLInpaintPipeline):
    """SDXL inpainting with a guidance scale per image."""


GUIDED_CLASSES[(StableDiffusionPipeline, "inpaint")] = GuidedInpaint
GUIDED_CLASSES[(StableDiffusionXLPipeline, "inpaint")] = GuidedXLInpaint


def init_images(key: BatchKey, specs: list[ImageSpec]) -> list[PIL.Image.Image]:
    """Each spec's init image (modes "image" and "inpaint"), checked to be the key's size, so
    a bad batch fails with a reason instead of deep inside diffusers."""
    size = (key.width, key.height)
    for spec in specs:
        image = spec.init_image
        if not isinstance(image, PIL.Image.Image) or image.size != size:
            got = getattr(image, "size", None)
            raise ValueError(f"mode {key.mode!r} needs an init image of {size}, got {got}.")
    return [spec.init_image.convert("RGB") for spec in specs]


def inpaint_arguments(key: BatchKey, specs: list[ImageSpec]) -> dict[str, Any]:
    """Zoom Out and Pan: everything outside each image's keep box, and the feather band
    inside it, is painted from noise (strength 1); the runner pastes the kept pixels back."""
    if any(spec.keep_box is None for spec in specs):
        raise ValueError("mode 'inpaint' needs the box of the init image kept, per image.")
    size = (key.width, key.height)
    return {
        "image": init_images(key, specs),
        "mask_image": [repaint_mask(size, spec.keep_box) for spec in specs],
        "strength": 1.0,
        "width": key.width,
        "height": key.height,
    }


def pasted_back(
    pictures: list[PIL.Image.Image],
    specs: list[ImageSpec],
    withheld: list[bool],
    blank: list[bool],
) -> list[PIL.Image.Image]:
    """Mode "inpaint": each painted picture with its parent's pixels where they were, past the
    feather; a withheld or blank image stays as it is."""
    return [
        picture if hidden or empty else paste_back(picture, spec.init_image, spec.keep_box)
        for picture, spec, hidden, empty in zip(pictures, specs, withheld, blank, strict=True)
    ]


def use_vae_tiles(vae: AutoencoderKL, tiled: bool) -> None:
    """Set per call: above VAE_TILING_PIXELS the VAE encodes and decodes in tiles, since its
    activations at full size, not the UNet's, are what a 2048² image would not fit in."""
    if tiled:
        vae.enable_tiling()
    else:
        vae.disable_tiling()
