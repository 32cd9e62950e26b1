"""Every setting the code reads is documented in .env.example and the README."""

from pathlib import Path

from bot.settings import _FIELDS, _LIMIT_FIELDS

ROOT = Path(__file__).resolve().parent.parent
VARIABLES = ["DISCORD_TOKEN", *_FIELDS, *_LIMIT_FIELDS]


def test_env_example_lists_every_setting():
    text = (ROOT / ".env.example").read_text()
    missing = [v for v in VARIABLES if f"\n{v}=" not in text]
    assert missing == []


def test_readme_lists_every_setting():
    text = (ROOT / "README.md").read_text()
    missing = [v for v in VARIABLES if f"`{v}`" not in text]
    assert missing == []
