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


def test_the_error_table_lists_every_error_the_code_can_answer() -> None:
    """Every (status, code) of a GatewayError subclass anywhere in app/, and the server guards' canned
    answers (408, 431), has a row in the README's error table; no row names a code that does not exist."""
    import importlib
    import pkgutil
    import re

    import app
    from app.errors import GatewayError

    for module in pkgutil.walk_packages(app.__path__, "app."):
        if not module.name.startswith(("app.triton_models", "app.bench")):
            importlib.import_module(module.name)

    def subclasses(cls: type) -> set[type]:
        found = set(cls.__subclasses__())
        return found.union(*(subclasses(c) for c in found)) if found else found

    in_code = {(c.status_code, c.code) for c in subclasses(GatewayError)}
    in_code |= {(408, "request_timeout"), (431, "request_header_fields_too_large")}  # app/server.py _canned
    table = README.split("| status | when | `error.code` |", 1)[1].split("\n\n", 1)[0]
    rows = {
        (int(m[1]), m[2]) for m in re.finditer(r"^\| (\d{3})[^|]*\|[^\n]*\| `([a-z_]+)` \|$", table, re.M)
    }
    assert in_code - rows == set(), f"errors missing from the README table: {sorted(in_code - rows)}"
    assert rows - in_code == set(), f"README rows for codes the code never answers: {sorted(rows - in_code)}"
