"""The models one device holds: loaded lazily by allowlist name and kept while they fit in a
memory budget, the least recently used unloaded first; and each call's LoRA set.

A switch between two models that do not fit together costs one load: unloading only drops
references (the weights are freed at once unless a reference cycle holds them, and then a
full garbage collection runs). LoRA adapters are loaded once per model and then switched per
call by weight, never per image.
"""

from __future__ import annotations

import copy
import gc
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from diffusers import DiffusionPipeline

from bot.pipelines.devices import memory_budget, module_bytes
from bot.pipelines.flow import FlowPromptEncoder, is_flow
from bot.pipelines.loading import (
    PipelineOptions,
    load_pipeline,
    load_tokenizer,
    lora_file,
    prompt_tokenizer,
    weights_bytes,
)
from bot.pipelines.prompt_encoding import PromptEncoder

if TYPE_CHECKING:
    from bot.models import Catalog

log = logging.getLogger(__name__)

Loras = tuple[tuple[str, float], ...]


@dataclass
class Resident:
    """A loaded model: its pipeline, prompt encoder, bytes of weights and LoRAs loaded into it."""

    pipe: DiffusionPipeline
    encoder: PromptEncoder | FlowPromptEncoder
    size: int
    adapters: set[str] = field(default_factory=set)


class ResidentModels:
    """The loaded models of one device, by allowlist name (without an allowlist, the name is
    the source). The device's worker thread loads and switches LoRAs; `resident_models` and
    `tokenizer` may be called from any thread."""

    def __init__(
        self,
        options: PipelineOptions,
        catalog: Catalog | None,
        device: torch.device,
        release_memory: Callable[[], None],
    ) -> None:
        self.options = options
        self.catalog = catalog
        self.budget = options.memory_budget_bytes or memory_budget(device)
        self._release_memory = release_memory
        self._resident: OrderedDict[str, Resident] = OrderedDict()  # least recent first
        self._sizes: dict[str, int] = {}  # measured when first loaded, kept after unloading
        self._tokenizers: dict[str, Any] = {}
        self._lock = threading.Lock()  # guards the dicts other threads read

    def resident_models(self) -> frozenset[str]:
        """The models loaded now (a snapshot)."""
        with self._lock:
            return frozenset(self._resident)

    def source(self, model: str) -> tuple[str, PipelineOptions]:
        """Where `model` loads from and with which options: its allowlist entry's (its pinned
        revision, its own safety checker setting, if any), or the name itself without one."""
        entry = None if self.catalog is None else self.catalog.models.get(model)
        if entry is None:  # no allowlist, or a name only a test or the command line uses
            return model, self.options
        options = replace(self.options, revision=entry.revision)
        if entry.safety_checker is None:
            return entry.source, options
        return entry.source, replace(options, safety_checker=entry.safety_checker)

    def load(self, model: str) -> Resident:
        """`model`, loaded now (after unloading the least recently used models it would not
        fit beside) unless it is resident; either way the most recently used from now on."""
        with self._lock:
            resident = self._resident.get(model)
            if resident is not None:
                self._resident.move_to_end(model)
                return resident
        source, options = self.source(model)
        self.make_room(self._sizes.get(model) or weights_bytes(source, options))
        pipe = load_pipeline(source, options)
        size = module_bytes(pipe.components.values())
        if size > self.budget:
            log.warning(
                "%s takes %.2f GiB, more than the %.2f GiB budget for resident models "
                "(MODEL_MEMORY_GB); it runs alone",
                model,
                size / 2**30,
                self.budget / 2**30,
            )
        encoder = FlowPromptEncoder(pipe) if is_flow(pipe) else PromptEncoder.for_pipeline(pipe)
        resident = Resident(pipe, encoder, size)
        # A copy: the pipeline reconfigures its own per call.
        tokenizer = copy.deepcopy(prompt_tokenizer(pipe))
        with self._lock:
            self._sizes[model] = size
            self._tokenizers.setdefault(model, tokenizer)
            self._resident[model] = resident
        self.make_room(0, keep=model)  # in case the estimate fell short
        return resident

    def make_room(self, needed: int, keep: str | None = None) -> None:
        """Unload least recently used models (never `keep`) until `needed` more bytes fit."""
        while True:
            with self._lock:
                others = [name for name in self._resident if name != keep]
                used = sum(resident.size for resident in self._resident.values())
                if not others or used + needed <= self.budget:
                    return
                unloaded = self._resident.pop(others[0])
            log.info("unloading %s (%.2f GiB) to make room", others[0], unloaded.size / 2**30)
            modules = unloaded.pipe.components.values()
            weights = [weakref.ref(m) for m in modules if isinstance(m, torch.nn.Module)]
            del unloaded, modules  # this held the only references
            if any(ref() is not None for ref in weights):
                gc.collect()  # reference cycles hold some; a full collection takes ~0.5 s
            self._release_memory()

    def use_loras(self, model: str, loras: Loras) -> None:
        """Make `loras` (name, weight) the active set of resident `model` for its next call:
        each adapter is loaded once per model, then only its weight is set. A weight of 0
        leaves that LoRA out, and no LoRA at all disables them: the model's own pixels."""
        resident = self._resident[model]
        active = [(name, weight) for name, weight in loras if weight != 0]
        if not active:
            if resident.adapters:
                resident.pipe.disable_lora()
            return
        for name, _ in active:
            if name not in resident.adapters:
                entry = None if self.catalog is None else self.catalog.loras.get(name)
                source, pin = (name, None) if entry is None else (entry.source, entry.revision)
                resident.pipe.load_lora_weights(
                    str(lora_file(source, replace(self.options, revision=pin))), adapter_name=name
                )
                resident.adapters.add(name)
                resident.size = module_bytes(resident.pipe.components.values())
        resident.pipe.enable_lora()
        resident.pipe.set_adapters(
            [name for name, _ in active], adapter_weights=[weight for _, weight in active]
        )

    def tokenizer(self, model: str) -> Any:
        """`model`'s tokenizer that bounds its prompts (`prompt_tokenizer`), kept after the
        model is unloaded; loaded alone from its files if the model never was."""
        with self._lock:
            tokenizer = self._tokenizers.get(model)
        if tokenizer is None:
            tokenizer = load_tokenizer(*self.source(model))
            with self._lock:
                tokenizer = self._tokenizers.setdefault(model, tokenizer)
        return tokenizer
