"""The README documents every setting, and its Quick start is the two commands CI and newcomers use."""

from __future__ import annotations

from pathlib import Path

from app.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    missing = [
        f"TGW_{name.upper()}" for name in Settings.model_fields if f"`TGW_{name.upper()}`" not in README
    ]
    assert not missing, f"settings missing from README.md: {missing}"


def test_quick_start_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make run" in quick and "make test" in quick
