"""The models and LoRAs members may choose: the owner's allowlist (`models.toml`) as a `Catalog`.

Two kinds of input, trusted differently. The owner's file is checked strictly at start-up
(`load_catalog` raises `ModelsFileError`, a `SettingsError`, naming the key and the file).
Members' choices are hostile: `Catalog.entry` and `Catalog.check_loras` bound them before
parsing and refuse with `InvalidRequest`, naming the allowed values. Pure Python, no torch."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bot.downloads import is_hub_model
from bot.families import FLOW_FAMILIES, FLOW_SCHEDULERS, SIZE_STEPS
from bot.lora_text import MAX_LORAS_TEXT as MAX_LORAS_TEXT  # the cogs bound `lora:` with it
from bot.lora_text import MAX_NAME_CHARS, NAME, Loras, lora_pairs, parse_loras, shown
from bot.requests import ALL_SCHEDULERS, InvalidRequest, Limits
from bot.settings import SettingsError

# A pinned revision: a full commit id, the one Hub revision that never moves.
_COMMIT = re.compile(r"[0-9a-f]{40}")


class ModelsFileError(SettingsError):
    """The owner's models.toml is malformed; the message names the file and the key."""


@dataclass(frozen=True)
class ModelEntry:
    """One allowlisted model: where its weights come from, and its own defaults and limits
    (None: the server's)."""

    name: str
    source: str  # a Hub id, a local folder, or a built-in (bot/downloads.BUILTIN_SOURCES)
    description: str = ""
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    negative_prompt: str = ""  # put before every member's negative prompt
    max_steps: int | None = None
    safety_checker: bool | None = None
    inpaint: str | None = None  # the allowlisted model that paints Zoom Out and Pan fills
    nsfw: bool = False  # offered and admitted only in age-restricted channels
    revision: str | None = None  # the Hub commit the source is pinned to (None: main)
    # "sd", "sdxl", "flux" (bot/families.py): learnt at start-up from the model's own
    # model_index.json (`Catalog.learn_families`), never set in models.toml; None: unknown.
    family: str | None = None


@dataclass(frozen=True)
class LoraEntry:
    """One allowlisted LoRA and the models it fits."""

    name: str
    source: str  # a Hub id (its .safetensors file), a local .safetensors file, or a built-in
    models: tuple[str, ...]
    description: str = ""
    revision: str | None = None  # the Hub commit the source is pinned to (None: main)


@dataclass
class Catalog:
    """What members may choose. `missing` holds the sources not on this machine (found at
    start-up); models and LoRAs with such a source are refused until they are fetched."""

    default: str
    models: dict[str, ModelEntry]
    loras: dict[str, LoraEntry] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)

    @classmethod
    def single(cls, model_id: str) -> Catalog:
        """Without an allowlist: the one model MODEL_ID, named by its source."""
        return cls(model_id, {model_id: ModelEntry(model_id, model_id)})

    def entry(self, name: Any) -> ModelEntry:
        """The model a member named (None: the default); InvalidRequest("model") otherwise."""
        if name is None:
            return self.models[self.default]
        model = self.models.get(name.strip()) if isinstance(name, str) else None
        if model is None:
            what = f"there is no model {shown(str(name))}"
        elif model.name in self.fill_only:
            what = f"{model.name} only paints the new area of Zoom Out and Pan"
        elif model.source in self.missing:
            what = f"{model.name} is not installed yet (fetched with `python -m bot download`)"
        else:
            return model
        choices = ", ".join(m.name for m in self.usable_models()) or "none is installed"
        raise InvalidRequest("model", f"{what}; choose one of: {choices}.")

    def own_defaults(self, name: Any) -> frozenset[str]:
        """The options model `name` (None: the default) sets its own default for; none for a
        name that is not a model (validation refuses it)."""
        if name is not None and not isinstance(name, str):
            return frozenset()
        entry = self.models.get(self.default if name is None else name.strip())
        if entry is None:
            return frozenset()
        options = ("steps", "guidance", "width", "height", "scheduler")
        own = {o for o in options if getattr(entry, o) is not None}
        if entry.family in FLOW_FAMILIES:
            own.add("scheduler")  # a member's saved SD scheduler would not apply
        return frozenset(own)

    def learn_families(self, families: Mapping[str, str | None]) -> None:
        """Note each model's family (by model name), read from its files at start-up."""
        for name, family in families.items():
            self.models[name] = replace(self.models[name], family=family)

    @property
    def fill_only(self) -> set[str]:
        """Other models' `inpaint` models: Zoom Out and Pan use them, members cannot pick them
        (an inpainting UNet cannot draw from text or vary an image)."""
        return {m.inpaint for m in self.models.values() if m.inpaint and m.inpaint != m.name}

    def usable_models(self) -> list[ModelEntry]:
        """The models members can use now, in the file's order."""
        hidden = self.fill_only
        return [
            m for m in self.models.values() if not (m.source in self.missing or m.name in hidden)
        ]

    def check_audience(self, model: str, age_restricted: bool) -> None:
        """Refuse with InvalidRequest("model") a model the owner marked `nsfw` outside an
        age-restricted channel (a DM is none): Discord keeps adult content in those."""
        if age_restricted or not self.models[model].nsfw:
            return
        here = [m.name for m in self.usable_models() if not m.nsfw]
        raise InvalidRequest(
            "model",
            f"{model} works only in age-restricted channels; here choose one of: "
            f"{', '.join(here) or 'none is offered'}.",
        )

    def loras_for(self, model: str) -> list[LoraEntry]:
        """The LoRAs members can use with `model` now, by name."""
        fitting = [lora for lora in self.loras.values() if model in lora.models]
        return sorted((x for x in fitting if x.source not in self.missing), key=lambda x: x.name)

    def check_loras(self, model: str, loras: Any) -> Loras:
        """A member's LoRAs for `model`, as `lora:` text ("pixel-art:0.8 other") or (name,
        weight) pairs, checked and sorted by name. InvalidRequest("lora") names what fits."""
        if loras is None or loras == "":
            return ()
        pairs = parse_loras(loras) if isinstance(loras, str) else lora_pairs(loras)
        fitting = {lora.name for lora in self.loras_for(model)}
        for name, _ in pairs:
            if name not in fitting:
                allowed = (
                    f"for {model} choose from: {', '.join(sorted(fitting))}"
                    if fitting
                    else f"{model} takes no LoRAs on this server"
                )
                known = self.loras.get(name)
                what = f"does not fit {model}"
                if known is None or known.source in self.missing:
                    what = (
                        "is not a LoRA on this server" if known is None else "is not installed yet"
                    )
                raise InvalidRequest("lora", f"{shown(name)} {what}; {allowed}.")
        return pairs

    def limits_for(self, model: str, base: Limits) -> Limits:
        """The server's limits with `model`'s own defaults, never past the server's bounds."""
        entry = self.models[model]
        max_steps = min(base.max_steps, entry.max_steps or base.max_steps)

        def side(value: int | None, default: int) -> int:
            return default if value is None else min(max(value, base.min_side), base.max_side)

        return replace(
            base,
            max_steps=max_steps,
            default_steps=min(entry.steps or base.default_steps, max_steps),
            default_guidance=(
                base.default_guidance
                if entry.guidance is None
                else min(entry.guidance, base.max_guidance)
            ),
            default_width=side(entry.width, base.default_width),
            default_height=side(entry.height, base.default_height),
            default_scheduler=entry.scheduler
            or (FLOW_SCHEDULERS[0] if entry.family in FLOW_FAMILIES else base.default_scheduler),
            size_step=SIZE_STEPS.get(entry.family or "", base.size_step),
        )

    def sources(self) -> list[tuple[str, str, str | None]]:
        """Every source the allowlist names, as (kind, source, revision), kind "model" or
        "lora", revision the commit it is pinned to or None."""
        found = [("model", m.source, m.revision) for m in self.models.values()]
        found += [("lora", lora.source, lora.revision) for lora in self.loras.values()]
        return list(dict.fromkeys(found))


# --- The owner's file -------------------------------------------------------------------------


def load_catalog(path: Path, model_id: str) -> Catalog:
    """The allowlist in `path`, or, when there is no such file, the one model `model_id`
    (the bot before allowlists). Raises ModelsFileError naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        return Catalog.single(model_id)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as problem:
        raise ModelsFileError(f"{path}: cannot be read as TOML: {problem}") from None
    return _catalog(data, _Where(path))


@dataclass(frozen=True)
class _Where:
    """Where in the owner's file a value sits, for error messages."""

    path: Path

    def error(self, key: str, message: str) -> ModelsFileError:
        return ModelsFileError(f"{self.path}: `{key}` {message}")


def _catalog(data: dict[str, Any], where: _Where) -> Catalog:
    """The whole file checked strictly, so a typo stops start-up instead of a member's request."""
    _known_keys(data, {"default", "models", "loras"}, "", where)
    models_table = _table(data.get("models"), "models", where, required=True)
    models = {
        name: _model(name, _table(value, f"models.{name}", where), where)
        for name, value in models_table.items()
    }
    if not models:
        raise where.error("models", "must list at least one model, as [models.NAME].")
    default = data.get("default")
    choices = ", ".join(models)
    if not isinstance(default, str) or default not in models:
        raise where.error(
            "default", f"must name the model used when a member names none: one of {choices}."
        )
    for model in models.values():
        if model.inpaint is not None and model.inpaint not in models:
            raise where.error(f"models.{model.name}.inpaint", f"must be one of {choices}.")
    loras_table = _table(data.get("loras"), "loras", where, required=False)
    loras = {
        name: _lora(name, _table(value, f"loras.{name}", where), models, where)
        for name, value in loras_table.items()
    }
    return Catalog(default, models, loras)


_MODEL_KEYS: dict[str, tuple[type, ...]] = {
    "source": (str,),
    "revision": (str,),
    "description": (str,),
    "steps": (int,),
    "guidance": (int, float),
    "width": (int,),
    "height": (int,),
    "scheduler": (str,),
    "negative_prompt": (str,),
    "max_steps": (int,),
    "safety_checker": (bool,),
    "inpaint": (str,),
    "nsfw": (bool,),
}
_RANGES: dict[str, tuple[float, float]] = {
    "steps": (1, 150),
    "max_steps": (1, 150),
    "guidance": (0, 30),
    "width": (64, 4096),
    "height": (64, 4096),
}


def _model(name: str, table: dict[str, Any], where: _Where) -> ModelEntry:
    """One [models.NAME] table: known keys, types and ranges, naming the key that is wrong."""
    key = f"models.{name}"
    _check_name(name, key, where)
    _known_keys(table, set(_MODEL_KEYS), key, where)
    values: dict[str, Any] = {}
    for option, value in table.items():
        _check_type(value, _MODEL_KEYS[option], f"{key}.{option}", where)
        if option in _RANGES:
            low, high = _RANGES[option]
            if not low <= value <= high:
                raise where.error(f"{key}.{option}", f"must be from {low} to {high}, got {value}.")
        values[option] = value
    for side in ("width", "height"):
        if values.get(side, 0) % 8:
            raise where.error(f"{key}.{side}", f"must be a multiple of 8, got {values[side]}.")
    scheduler = values.get("scheduler")
    if scheduler is not None and scheduler not in ALL_SCHEDULERS:
        raise where.error(f"{key}.scheduler", f"must be one of: {', '.join(ALL_SCHEDULERS)}.")
    if values.get("steps", 0) > values.get("max_steps", 150):
        raise where.error(f"{key}.steps", f"must not exceed max_steps ({values['max_steps']}).")
    _check_source(values, key, where)
    if "guidance" in values:
        values["guidance"] = float(values["guidance"])
    return ModelEntry(name=name, **values)


def _lora(
    name: str, table: dict[str, Any], models: Mapping[str, ModelEntry], where: _Where
) -> LoraEntry:
    key = f"loras.{name}"
    _check_name(name, key, where)
    _known_keys(table, {"source", "revision", "models", "description"}, key, where)
    _check_source(table, key, where)
    description = table.get("description", "")
    _check_type(description, (str,), f"{key}.description", where)
    fits = table.get("models")
    choices = ", ".join(models)
    if (
        not isinstance(fits, list)
        or not fits
        or not all(isinstance(model, str) and model in models for model in fits)
    ):
        raise where.error(f"{key}.models", f"must list the models this LoRA fits, from: {choices}.")
    revision = table.get("revision")
    return LoraEntry(name, table["source"], tuple(dict.fromkeys(fits)), description, revision)


def _check_source(table: Mapping[str, Any], key: str, where: _Where) -> None:
    source = table.get("source")
    if not isinstance(source, str) or not source.strip():
        raise where.error(
            f"{key}.source", "must be a Hub id (owner/name), a local path or a built-in name."
        )
    # Only a full commit id pins: a branch or tag moves on the Hub, a short id is not taken.
    revision = table.get("revision")
    if revision is not None and not (isinstance(revision, str) and _COMMIT.fullmatch(revision)):
        raise where.error(
            f"{key}.revision",
            f"must be a commit id of the Hub repo, 40 hex digits in lowercase (a branch or tag "
            f"name moves; a commit does not), got {revision!r}.",
        )
    if revision is not None and not is_hub_model(source):
        raise where.error(
            f"{key}.revision", f"pins a Hub repo's commit, and {source!r} is not a Hub id."
        )


def _check_name(name: str, key: str, where: _Where) -> None:
    if not NAME.fullmatch(name):
        raise where.error(
            key,
            f"is not a usable name: up to {MAX_NAME_CHARS} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit.",
        )


def _check_type(value: Any, kinds: tuple[type, ...], key: str, where: _Where) -> None:
    wrong_bool = isinstance(value, bool) and bool not in kinds  # TOML true is not a number
    if wrong_bool or not isinstance(value, kinds):
        names = {str: "text", int: "a whole number", float: "a number", bool: "true or false"}
        raise where.error(key, f"must be {' or '.join(names[k] for k in kinds)}, got {value!r}.")


def _table(value: Any, key: str, where: _Where, *, required: bool = True) -> dict[str, Any]:
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise where.error(key, "must be a table, as [" + key + "] or [" + key + ".NAME].")
    return value


def _known_keys(table: Mapping[str, Any], known: set[str], key: str, where: _Where) -> None:
    for option in table:
        if option not in known:
            raise where.error(
                f"{key}.{option}" if key else option,
                f"is not a known key; use one of: {', '.join(sorted(known))}.",
            )
