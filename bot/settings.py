"""Typed settings from the environment and `.env`.

Built by `load_settings()` rather than at import time, so tests and the command line import
the package without a token. Each bad value stops start-up with one line naming the variable.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv import dotenv_values

from bot.requests import Limits


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names the variable and what is allowed."""


DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "float16", "bfloat16", "float32")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
EXECUTORS = ("local", "ray")
# Images the safety checker flags: withheld everywhere, or shown as spoilers in age-restricted
# channels (and withheld elsewhere).
NSFW_CHANNELS = ("withhold", "allow")


@dataclass(frozen=True)
class Settings:
    discord_token: str
    model_id: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    database_path: Path = Path("data/bot.sqlite3")
    model_cache: Path = Path("data/models")
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 8
    attention_slicing: bool = False
    vae_decode_batch: int = 1
    channels_last: bool = False
    torch_compile: bool = False
    safety_checker: bool = True
    nsfw_channels: str = "withhold"
    discord_api_base: str | None = None
    log_level: str = "INFO"
    log_prompts: bool = False  # member text in discord.py's debug lines (bot/logs.py)
    max_upload_bytes: int = 10 * 2**20
    max_upload_pixels: int = 4096 * 4096
    vary_subtle: float = 0.35
    vary_strong: float = 0.75
    message_content: bool = False
    shutdown_grace: float = 30.0
    preview_every: int = 5
    daily_quota: float = 0  # cost units per rolling 24 hours (bot/quota.py)
    quota_exempt_roles: frozenset[int] = frozenset()
    max_queued_per_member: int = 3
    max_request_cost: float = 32.0
    role_weights: dict[int, float] = field(default_factory=dict)
    max_prompt_chunks: int = 4
    max_permutations: int = 4
    auto_download: bool = True
    dev_guild_id: int | None = None
    # Models and LoRAs (bot/models.py): the owner's allowlist, and the memory the resident
    # models may take (None: from the device).
    models_file: Path = Path("models.toml")
    model_memory_gb: float | None = None
    # Upscale ×2: image-to-image strengths of the high-resolution pass; Pan: pixels added.
    upscale_subtle: float = 0.3
    upscale_creative: float = 0.55
    pan_step: int = 256
    # Results above this many pixels are encoded and decoded by the VAE in tiles.
    vae_tiling_pixels: int = 1024 * 1024
    # Where diffusers calls run: "local" (a thread of this process) or "ray" (bot/workers).
    executor: str = "local"
    ray_address: str | None = None
    ray_workers: int | None = None
    worker_timeout: float = 600.0
    metrics_port: int | None = None
    # The metrics endpoint has no authentication: loopback unless the owner says otherwise.
    metrics_host: str = "127.0.0.1"
    limits: Limits = field(default_factory=Limits)

    def __repr__(self) -> str:  # never let the token reach a log line or traceback
        return f"Settings(model_id={self.model_id!r}, device={self.device!r}, token=<hidden>)"


def _parse_number(
    kind: type[int] | type[float], low: float, high: float
) -> Callable[[str, str], Any]:
    what = "a whole number" if kind is int else "a number"

    def parse(name: str, raw: str) -> int | float:
        try:
            value = kind(raw)
        except ValueError:
            raise SettingsError(
                f"{name} must be {what} from {low} to {high}, got {raw!r}"
            ) from None
        if not low <= value <= high:
            raise SettingsError(f"{name} must be from {low} to {high}, got {value}")
        return value

    return parse


def _parse_int(low: int, high: int) -> Callable[[str, str], int]:
    return _parse_number(int, low, high)


def _parse_float(low: float, high: float) -> Callable[[str, str], float]:
    return _parse_number(float, low, high)


def _parse_bool(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{name} must be true or false, got {raw!r}") from None


def _parse_choice(choices: tuple[str, ...]) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        if raw not in choices:
            raise SettingsError(
                f"{name} must be one of {', '.join(choices)}, got {raw!r}"
            ) from None
        return raw

    return parse


def _parse_side(name: str, raw: str) -> int:
    value = _parse_int(8, 4096)(name, raw)
    if value % 8:
        raise SettingsError(f"{name} must be a multiple of 8, got {value}")
    return value


def _parse_ids(name: str, raw: str) -> frozenset[int]:
    parts = [part.strip() for part in raw.split(",") if part.strip()]
    if not all(part.isdigit() for part in parts):
        raise SettingsError(f"{name} must be role ids separated by commas, got {raw!r}")
    return frozenset(int(part) for part in parts)


def _parse_weights(name: str, raw: str) -> dict[int, float]:
    """`role_id:weight` pairs separated by commas, each weight from 0.1 to 100."""
    weights: dict[int, float] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        role, _, weight = part.partition(":")
        if not role.strip().isdigit() or not weight:
            raise SettingsError(
                f"{name} must be role_id:weight pairs separated by commas, got {raw!r}"
            )
        weights[int(role)] = _parse_float(0.1, 100.0)(name, weight.strip())
    return weights


def _parse_text(name: str, raw: str) -> str:
    if not raw.strip():
        raise SettingsError(f"{name} must not be empty")
    return raw.strip()


def _parse_address(name: str, raw: str) -> str:
    try:
        return str(ipaddress.ip_address(raw.strip()))
    except ValueError:
        raise SettingsError(
            f"{name} must be an IP address to listen on (127.0.0.1, the default; 0.0.0.0 for "
            f"every interface), got {raw!r}"
        ) from None


_parse_megabytes = _parse_float(0.1, 100.0)

# variable -> (field, parser); one table, so .env.example and the README can list the same names.
_FIELDS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "MODEL_ID": ("model_id", _parse_text),
    "DATABASE_PATH": ("database_path", lambda n, raw: Path(_parse_text(n, raw))),
    "MODEL_CACHE": ("model_cache", lambda n, raw: Path(_parse_text(n, raw))),
    "DEVICE": ("device", _parse_choice(DEVICES)),
    "DTYPE": ("dtype", _parse_choice(DTYPES)),
    "MAX_BATCH_SIZE": ("max_batch_size", _parse_int(1, 64)),
    "ATTENTION_SLICING": ("attention_slicing", _parse_bool),
    "VAE_DECODE_BATCH": ("vae_decode_batch", _parse_int(1, 64)),
    "CHANNELS_LAST": ("channels_last", _parse_bool),
    "TORCH_COMPILE": ("torch_compile", _parse_bool),
    "SAFETY_CHECKER": ("safety_checker", _parse_bool),
    "NSFW_CHANNELS": ("nsfw_channels", _parse_choice(NSFW_CHANNELS)),
    "DISCORD_API_BASE": ("discord_api_base", _parse_text),
    "MAX_UPLOAD_MB": (
        "max_upload_bytes",
        lambda n, raw: int(_parse_float(0.1, 100.0)(n, raw) * 2**20),
    ),
    "MAX_UPLOAD_PIXELS": ("max_upload_pixels", _parse_int(64 * 64, 100_000_000)),
    "VARY_SUBTLE": ("vary_subtle", _parse_float(0.05, 1.0)),
    "VARY_STRONG": ("vary_strong", _parse_float(0.05, 1.0)),
    "MESSAGE_CONTENT": ("message_content", _parse_bool),
    "PREVIEW_EVERY": ("preview_every", _parse_int(0, 1000)),
    "SHUTDOWN_GRACE": ("shutdown_grace", _parse_float(0.0, 600.0)),
    "DAILY_QUOTA": ("daily_quota", _parse_float(0.0, 100_000.0)),
    "QUOTA_EXEMPT_ROLES": ("quota_exempt_roles", _parse_ids),
    "MAX_QUEUED_PER_MEMBER": ("max_queued_per_member", _parse_int(0, 1000)),
    "MAX_REQUEST_COST": ("max_request_cost", _parse_float(0.1, 10_000.0)),
    "ROLE_WEIGHTS": ("role_weights", _parse_weights),
    "MAX_PROMPT_CHUNKS": ("max_prompt_chunks", _parse_int(1, 16)),
    "MAX_PERMUTATIONS": ("max_permutations", _parse_int(1, 16)),
    "AUTO_DOWNLOAD": ("auto_download", _parse_bool),
    "DEV_GUILD_ID": ("dev_guild_id", _parse_int(1, 2**63 - 1)),
    "MODELS_FILE": ("models_file", lambda n, raw: Path(_parse_text(n, raw))),
    "MODEL_MEMORY_GB": ("model_memory_gb", _parse_float(0.01, 4096.0)),
    "UPSCALE_SUBTLE": ("upscale_subtle", _parse_float(0.05, 1.0)),
    "UPSCALE_CREATIVE": ("upscale_creative", _parse_float(0.05, 1.0)),
    "PAN_STEP": ("pan_step", _parse_side),
    "VAE_TILING_PIXELS": ("vae_tiling_pixels", _parse_int(64 * 64, 100_000_000)),
    "EXECUTOR": ("executor", _parse_choice(EXECUTORS)),
    "RAY_ADDRESS": ("ray_address", _parse_text),
    "RAY_WORKERS": ("ray_workers", _parse_int(1, 64)),
    "WORKER_TIMEOUT": ("worker_timeout", _parse_float(1.0, 86_400.0)),
    "METRICS_PORT": ("metrics_port", _parse_int(1, 65535)),
    "METRICS_HOST": ("metrics_host", _parse_address),
    "LOG_LEVEL": ("log_level", lambda n, raw: _parse_choice(LOG_LEVELS)(n, raw.upper())),
    "LOG_PROMPTS": ("log_prompts", _parse_bool),
}
_LIMIT_FIELDS: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "MAX_STEPS": ("max_steps", _parse_int(1, 150)),
    "MIN_SIZE": ("min_side", _parse_side),
    "MAX_SIZE": ("max_side", _parse_side),
    "MAX_IMAGES_PER_REQUEST": ("max_count", _parse_int(1, 10)),
    "DEFAULT_STEPS": ("default_steps", _parse_int(1, 150)),
    "DEFAULT_GUIDANCE": ("default_guidance", _parse_float(0.0, 30.0)),
    "DEFAULT_WIDTH": ("default_width", _parse_side),
    "DEFAULT_HEIGHT": ("default_height", _parse_side),
    "DEFAULT_STRENGTH": ("default_strength", _parse_float(0.05, 1.0)),
}


def load_settings(
    environ: Mapping[str, str] | None = None,
    env_file: str | Path | None = ".env",
    *,
    require_token: bool = True,
) -> Settings:
    """Read settings from `environ` (default: the process environment) over `env_file`.
    The environment wins over the file, as in every twelve-factor app."""
    values: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        values.update({k: v for k, v in dotenv_values(env_file).items() if v is not None})
    values.update(os.environ if environ is None else environ)

    token = values.get("DISCORD_TOKEN", "").strip()
    if require_token and not token:
        raise SettingsError(
            "DISCORD_TOKEN is not set: copy the bot token from the Discord developer portal "
            "into the environment or .env"
        )
    kwargs: dict[str, Any] = {"discord_token": token}
    for variable, (name, parse) in _FIELDS.items():
        if values.get(variable, "") != "":
            kwargs[name] = parse(variable, values[variable])
    limit_kwargs: dict[str, Any] = {}
    for variable, (name, parse) in _LIMIT_FIELDS.items():
        if values.get(variable, "") != "":
            limit_kwargs[name] = parse(variable, values[variable])
    limits = Limits(**limit_kwargs)
    if limits.min_side > limits.max_side:
        raise SettingsError(
            f"MIN_SIZE ({limits.min_side}) must not exceed MAX_SIZE ({limits.max_side})"
        )
    for variable, side in (
        ("DEFAULT_WIDTH", limits.default_width),
        ("DEFAULT_HEIGHT", limits.default_height),
    ):
        if not limits.min_side <= side <= limits.max_side:
            raise SettingsError(
                f"{variable} must be from MIN_SIZE {limits.min_side} "
                f"to MAX_SIZE {limits.max_side}, got {side}"
            )
    if limits.default_steps > limits.max_steps:
        raise SettingsError(
            f"DEFAULT_STEPS ({limits.default_steps}) must not exceed MAX_STEPS ({limits.max_steps})"
        )
    return Settings(**kwargs, limits=limits)
