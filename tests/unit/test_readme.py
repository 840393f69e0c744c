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


def test_user_docs_say_what_they_mean_not_which_issue() -> None:
    """A reader has no access to the project's issue tracker: "issue 12" tells them nothing."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    pattern = re.compile(r"(?<!Triton )\bissue \d+\b|the issue's|\(issue\b", re.IGNORECASE)
    found = []
    for path in [root / "README.md", root / "k8s" / "README.md", *sorted((root / "docs").glob("*.md"))]:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()[:100]}")
    assert found == [], "\n".join(found)


def test_every_metric_the_code_defines_is_in_the_operations_metrics_table() -> None:
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    source = "\n".join(p.read_text() for p in (root / "app").rglob("*.py"))
    defined = set()
    for kind, name in re.findall(r"\b(Counter|Gauge|Histogram)\(\s*\"(tgw_[a-z_]+)\"", source):
        defined.add(f"{name}_total" if kind == "Counter" and not name.endswith("_total") else name)
    assert len(defined) >= 15, defined
    operations = (root / "docs" / "operations.md").read_text()
    missing = sorted(name for name in defined if f"`{name}`" not in operations)
    assert missing == [], f"metrics missing from docs/operations.md: {missing}"
