from pathlib import Path

import pytest

from bot.settings import SettingsError, load_settings


def settings(env_file=None, **env):
    return load_settings({"DISCORD_TOKEN": "t0ken", **env}, env_file=env_file)


def test_defaults():
    s = settings()
    assert s.model_id == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert s.device == "auto" and s.max_batch_size == 8
    assert s.database_path == Path("data/bot.sqlite3")
    assert s.discord_api_base is None
    assert s.limits.max_count == 4


def test_values_are_parsed_and_typed():
    s = settings(
        MODEL_ID="tiny",
        DEVICE="cpu",
        MAX_BATCH_SIZE="4",
        VAE_DECODE_BATCH="4",
        TORCH_COMPILE="yes",
        MAX_STEPS="30",
        MIN_SIZE="64",
        DEFAULT_WIDTH="64",
        DEFAULT_HEIGHT="128",
        DISCORD_API_BASE="http://127.0.0.1:9/api/v10",
        LOG_LEVEL="debug",
    )
    assert (s.model_id, s.device, s.max_batch_size, s.vae_decode_batch) == ("tiny", "cpu", 4, 4)
    assert s.torch_compile and not s.channels_last
    assert (s.limits.max_steps, s.limits.min_side, s.limits.default_height) == (30, 64, 128)
    assert s.discord_api_base == "http://127.0.0.1:9/api/v10" and s.log_level == "DEBUG"


def test_missing_token_names_the_variable():
    with pytest.raises(SettingsError, match="DISCORD_TOKEN"):
        load_settings({}, env_file=None)
    assert load_settings({}, env_file=None, require_token=False).discord_token == ""


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("DEVICE", "tpu", "DEVICE must be one of auto, cpu, cuda, mps"),
        ("MAX_BATCH_SIZE", "many", "MAX_BATCH_SIZE must be a whole number"),
        ("MAX_BATCH_SIZE", "0", "MAX_BATCH_SIZE must be from 1 to 64"),
        ("CHANNELS_LAST", "maybe", "CHANNELS_LAST must be true or false"),
        ("VAE_DECODE_BATCH", "0", "VAE_DECODE_BATCH must be from 1 to 64"),
        ("MAX_SIZE", "1001", "MAX_SIZE must be a multiple of 8"),
        ("DEFAULT_GUIDANCE", "x", "DEFAULT_GUIDANCE must be a number"),
        ("DEFAULT_STEPS", "60", "DEFAULT_STEPS (60) must not exceed MAX_STEPS"),
        ("DEFAULT_WIDTH", "128", "DEFAULT_WIDTH must be from MIN_SIZE"),
    ],
)
def test_bad_values_name_the_variable_and_what_is_allowed(variable, value, fragment):
    with pytest.raises(SettingsError) as caught:
        settings(**{variable: value})
    assert fragment in str(caught.value)


def test_env_file_is_read_and_environment_wins(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("MODEL_ID=from-file\nDEVICE=cpu\n")
    s = settings(env_file=env_file, DEVICE="cuda")
    assert (s.model_id, s.device) == ("from-file", "cuda")


def test_token_never_appears_in_repr():
    assert "t0ken" not in repr(settings())


def test_quota_settings():
    s = settings(DAILY_QUOTA="25", QUOTA_EXEMPT_ROLES="123, 456")
    assert s.daily_quota == 25 and s.quota_exempt_roles == frozenset({123, 456})
    with pytest.raises(SettingsError, match="QUOTA_EXEMPT_ROLES must be role ids"):
        settings(QUOTA_EXEMPT_ROLES="mods")
