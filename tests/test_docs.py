"""Every setting the code reads is documented in .env.example and the README."""

import re
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


def test_every_test_docs_security_names_exists():
    """docs/security.md proves each promise by a test's name: a renamed test must not leave a
    promise without its proof."""
    text = (ROOT / "docs" / "security.md").read_text()
    named = re.findall(r"`(test_\w+\.py)(?:::(test_\w+))?", text)
    named += [(None, name) for name in re.findall(r"`::(test_\w+)", text)]
    assert len(named) > 15
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    missing = [
        f"{file}::{test}"
        for file, test in named
        if (file and not (ROOT / "tests" / file).is_file())
        or (test and not re.search(rf"def {test}\b", sources))
    ]
    assert missing == []
