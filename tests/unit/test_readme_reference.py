"""The README's dx.yaml reference is the generated one (run `dx config-reference` to refresh)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.reference import BEGIN, END, reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_reference_is_current() -> None:
    text = README.read_text()
    assert BEGIN in text and END in text, "README lacks the generated configuration reference"
    current = text[text.index(BEGIN):text.index(END) + len(END)]
    assert current == reference(), "README is stale: replace the section with `dx config-reference`"
