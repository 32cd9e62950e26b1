"""Which device and dtype pipelines run on, how much of its memory a batch may take, and how
much resident models may take.

The start-up probe measures memory through `MemoryMeter`, so its arithmetic is testable
without a GPU; `CudaMemory` is the real meter.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# Share of the free GPU memory that batches may plan to use; the rest absorbs fragmentation.
MEMORY_HEADROOM = 0.85


def resolve_device(setting: str, dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """Turn the `device`/`dtype` settings into torch values; fail at start-up, not mid-batch."""
    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}.")
    if setting == "auto":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        elif torch.backends.mps.is_available():
            device = torch.device("mps")
        else:
            device = torch.device("cpu")
    elif setting == "cpu":
        device = torch.device("cpu")
    elif setting == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("device 'mps' was asked for but this machine has no MPS backend.")
        device = torch.device("mps")
    elif setting == "cuda" or setting.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {setting!r} was asked for but CUDA is not available here "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
                "use 'cpu' or 'auto'."
            )
        try:
            device = torch.device(setting)
        except RuntimeError as exc:
            raise ValueError(f"device {setting!r} is not a valid CUDA device name.") from exc
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {setting!r} was asked for but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible."
            )
    else:
        raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {setting!r}.")
    if dtype is not None:
        return device, _DTYPES[dtype]
    return device, torch.float32 if device.type == "cpu" else torch.float16


@dataclass(frozen=True)
class MemoryFit:
    """What the start-up probe measured: device bytes a call needs whatever its size
    (`fixed_bytes`) and per image (`per_image_bytes`), both at `probe_pixels`, and the bytes
    free for calls once the model is loaded."""

    fixed_bytes: int
    per_image_bytes: int
    probe_pixels: int
    free_bytes: int

    def images_that_fit(self, pixels: int) -> int:
        """The largest batch of `pixels`-sized images expected to fit. The per-image cost is
        scaled linearly from the probe, taken at the largest size, which overestimates it for
        smaller images whatever the attention kernel does; the fixed part is not scaled."""
        per_image = self.per_image_bytes * pixels / self.probe_pixels
        room = self.free_bytes * MEMORY_HEADROOM - self.fixed_bytes
        return max(1, int(room // per_image))


class MemoryMeter(Protocol):
    """A device allocator's counters, as the start-up memory probe reads them."""

    def start(self) -> int:
        """Clear cached blocks and the peak counter; return the bytes allocated now."""

    def peak(self) -> int:
        """The most bytes allocated since `start`."""

    def free(self) -> int:
        """Bytes the device has free, with nothing cached."""


class CudaMemory:
    """The CUDA caching allocator's counters for one device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> int:
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def free(self) -> int:
        torch.cuda.empty_cache()
        return torch.cuda.mem_get_info(self.device)[0]


def padded_batch_size(images: int, cap: int) -> int:
    """The batch a compiled call runs at: the next power of two, but never past the cap, so a
    compiled UNet meets a few batch shapes instead of one per batch size and compiles once
    for each."""
    bucket = 1
    while bucket < images:
        bucket *= 2
    return max(images, min(bucket, cap))


# Of a GPU's memory, what resident models may not take: room for the calls' activations (an
# SDXL batch at 1024×1024) and the allocator's fragmentation.
CALL_RESERVE_BYTES = 6 * 2**30
# Of a CPU's (or Apple's unified) memory, the share resident models may take.
RAM_SHARE_FOR_MODELS = 0.5


def memory_budget(device: torch.device) -> int:
    """Bytes resident models' weights may take on `device` when MODEL_MEMORY_GB is unset: a
    CUDA device's total memory less room for calls, else a share of the machine's RAM."""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        return max(total // 4, int(total * MEMORY_HEADROOM) - CALL_RESERVE_BYTES)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): assume a small machine
        ram = 16 * 2**30
    return int(ram * RAM_SHARE_FOR_MODELS)


def module_bytes(modules: Iterable[Any]) -> int:
    """The bytes of the parameters and buffers of every torch module among `modules` (a
    pipeline's components: tokenizers and schedulers hold no tensors)."""
    total = 0
    for module in modules:
        if isinstance(module, torch.nn.Module):
            tensors = [*module.parameters(), *module.buffers()]
            total += sum(tensor.numel() * tensor.element_size() for tensor in tensors)
    return total
