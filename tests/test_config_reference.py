"""The README's configuration table is generated from the settings classes and must be current."""

from __future__ import annotations

from pathlib import Path

from sd_endpoint.config_reference import END, START, readme_block

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    assert START in text and END in text
    current = text[text.index(START) : text.index(END) + len(END)]
    assert current == readme_block(), "run: python -m sd_endpoint.config_reference, and paste it into README.md"


def test_every_variable_has_a_meaning() -> None:
    rows = [line for line in readme_block().splitlines() if line.startswith("| `")]
    assert len(rows) > 40
    assert all(not line.rstrip().endswith("|  |") for line in rows)
