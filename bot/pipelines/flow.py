"""The flow-matching families beside the UNet ones: FLUX.1 ([dev], [schnell] and their
fine-tunes) for now; SD3 and newer transformer families plug in here the same way.

What differs from Stable Diffusion, and where it is handled:
- prompts: CLIP's pooled embedding and T5's sequence, encoded per image by diffusers' own
  `encode_prompt` (every prompt padded to the model's T5 length, so an image never depends on
  its batch mates); weights and BREAK are refused at validation (bot/service.py);
- guidance: FLUX.1 [dev] is guidance-distilled, its transformer embeds the scale per sample;
  `FlowPerImage.guided_call` hands it each image's own. No classifier-free pass; [schnell]
  (no guidance embedding) ignores the scale, as in diffusers;
- image-to-image: the runner's strength (chosen for SD's step count) becomes FLUX's own;
- latents: packed 2×2 patches, unpacked here for decoding and previews; the VAE's shift is
  applied by the runner's own decoding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch
from diffusers import (
    DiffusionPipeline,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    FluxPipeline,
)

from bot.families import FLOW_SCHEDULERS
from bot.prompts import parse_weights

# The scheduler flow models run with, by the name members pick.
FLOW_SCHEDULER = FLOW_SCHEDULERS[0]
# T5 tokens a real FLUX.1 model reads (diffusers' default and its maximum).
T5_TOKENS = 512

FLOW_PIPELINES: tuple[type[DiffusionPipeline], ...] = (FluxPipeline,)


def is_flow(pipe: Any) -> bool:
    """Whether a loaded pipeline is of a flow-matching family (a transformer, no UNet)."""
    return isinstance(pipe, FLOW_PIPELINES)


def readable_text(text: str) -> str:
    """What the text encoder reads of a prompt: escapes resolved. Weights and BREAK never get
    here (validation refuses them on flow models), so the text is its one segment."""
    return "".join(fragment.text for segment in parse_weights(text) for fragment in segment)


class FlowPromptEncoder:
    """A flow model's prompt embeddings, per image: CLIP pooled and T5's sequence, each prompt
    padded to the model's full T5 length. Negative prompts are not read (no CFG)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.tokens = min(T5_TOKENS, pipe.tokenizer_2.model_max_length)

    def chunk_count(self, text: str) -> int:
        return 1  # one sequence per prompt: the call never stretches prompts

    def arguments(self, prompts: list[str], negatives: list[str]) -> dict[str, torch.Tensor]:
        """The call's `prompt_embeds` and `pooled_prompt_embeds`, one row per image."""
        texts = [readable_text(prompt) for prompt in prompts]
        unique = list(dict.fromkeys(texts))
        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(
                prompt=unique, prompt_2=unique, max_sequence_length=self.tokens
            )
        rows = [unique.index(text) for text in texts]
        return {"prompt_embeds": embeds[rows], "pooled_prompt_embeds": pooled[rows]}


class FlowPerImage:
    """Mixed in before a diffusers FLUX pipeline class: `guided_call` runs its `__call__` with
    one distilled guidance scale per image, and returns and reports unpacked latents."""

    def guided_call(self, scales: Sequence[float], cfg: bool, **kwargs: Any) -> Any:
        """Call the pipeline with `scales[i]` as image i's guidance embedding input (when the
        transformer has one); `cfg` is unused: flow models here run no unconditional pass."""
        transformer = self.transformer
        own = torch.tensor(list(scales), dtype=torch.float32, device=transformer.device)

        def per_image(_module: Any, args: Any, inputs: dict[str, Any]) -> Any:
            if inputs.get("guidance") is not None:
                inputs["guidance"] = own  # diffusers passes the one scale, repeated per image
            return args, inputs

        width, height = _size(kwargs)
        # FLUX image-to-image resizes to 1024² unless told the size (SD's keeps the image's).
        kwargs.update(width=width, height=height)
        if "strength" in kwargs:
            kwargs["strength"] = flow_strength(kwargs["num_inference_steps"], kwargs["strength"])
        on_step = kwargs.pop("callback_on_step_end", None)
        if on_step is not None:
            kwargs["callback_on_step_end"] = self._unpacked(on_step, width, height)
        hook = transformer.register_forward_pre_hook(per_image, with_kwargs=True)
        try:
            output = self(**kwargs)
        finally:
            hook.remove()
        output.images = self._unpack_latents(output.images, height, width, self.vae_scale_factor)
        return output

    def _unpacked(self, on_step: Callable[..., Any], width: int, height: int) -> Callable[..., Any]:
        """The runner's step callback, shown the latents as (batch, channels, h, w)."""

        def callback(call: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
            latents = self._unpack_latents(tensors["latents"], height, width, self.vae_scale_factor)
            on_step(call, step, timestep, {**tensors, "latents": latents})
            return tensors

        return callback


def flow_strength(steps: int, strength: float) -> float:
    """The strength for which diffusers' FLUX image-to-image denoises the steps SD's does at
    `strength` (int(steps × strength): what the runner's strength is chosen for). FLUX counts
    steps - int(steps - steps × strength) instead; the middle of its interval is exact."""
    image_steps = min(int(steps * strength), steps)
    return 1.0 if image_steps >= steps else (image_steps - 0.5) / steps


def _size(kwargs: dict[str, Any]) -> tuple[int, int]:
    """The call's (width, height): given, or its init images' (all the key's size)."""
    if kwargs.get("width") and kwargs.get("height"):
        return kwargs["width"], kwargs["height"]
    image = kwargs["image"][0]
    if not isinstance(image, PIL.Image.Image):
        raise ValueError("a flow model's image call needs its width and height or PIL images")
    return image.size


class FlowText2Image(FlowPerImage, FluxPipeline):
    """FLUX text-to-image with a guidance scale per image."""


class FlowImage2Image(FlowPerImage, FluxImg2ImgPipeline):
    """FLUX image-to-image with a guidance scale per image."""


class FlowInpaint(FlowPerImage, FluxInpaintPipeline):
    """FLUX inpainting (Zoom Out, Pan) with a guidance scale per image."""


# The class each runner mode calls, by the family of the loaded pipeline.
FLOW_CLASSES: dict[tuple[type[DiffusionPipeline], str], type[FlowPerImage]] = {
    (FluxPipeline, "text"): FlowText2Image,
    (FluxPipeline, "image"): FlowImage2Image,
    (FluxPipeline, "inpaint"): FlowInpaint,
}
