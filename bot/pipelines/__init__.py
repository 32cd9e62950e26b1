"""Everything torch touches: devices and memory, the tiny model, loading, schedulers, the runner.

The rest of the bot stays importable and testable without a GPU; results and the interruption
signal live in the torch-free `bot.results`. The public names are re-exported here.
"""

from bot.pipelines.devices import (
    MEMORY_HEADROOM,
    CudaMemory,
    MemoryFit,
    MemoryMeter,
    padded_batch_size,
    resolve_device,
)
from bot.pipelines.loading import ModelNotAvailable, PipelineOptions, load_pipeline
from bot.pipelines.runner import PipelineRunner, decode_latents, latent_previews
from bot.pipelines.schedulers import make_scheduler, with_scheduler
from bot.pipelines.tiny import SD15_SCHEDULER_CONFIG, TINY_MODEL, build_tiny_model, tiny_tokenizer

__all__ = [
    "MEMORY_HEADROOM",
    "SD15_SCHEDULER_CONFIG",
    "TINY_MODEL",
    "CudaMemory",
    "MemoryFit",
    "MemoryMeter",
    "ModelNotAvailable",
    "PipelineOptions",
    "PipelineRunner",
    "build_tiny_model",
    "decode_latents",
    "latent_previews",
    "load_pipeline",
    "make_scheduler",
    "padded_batch_size",
    "resolve_device",
    "tiny_tokenizer",
    "with_scheduler",
]
