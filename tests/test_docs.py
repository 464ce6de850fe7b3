"""Generated documentation matches the code it describes."""

from pathlib import Path

from shared.config import FIELDS
from shared.config_docs import render

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_config_reference_is_current():
    text = (DOCS / "config.md").read_text(encoding="utf-8")
    assert text == render(), "docs/config.md is stale: run python -m shared.config_docs > docs/config.md"
    for name in FIELDS:
        assert f"| `{name}` |" in text
