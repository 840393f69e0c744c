"""The README documents every setting, and its Quick start is the two commands CI and newcomers use."""

from __future__ import annotations

from pathlib import Path

from app.errors import GatewayError
from app.settings import setting_fields, settings_markdown
from tests.app_errors import gateway_error_classes

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_readme_table() -> None:
    missing = [f.env for f in setting_fields() if f"`{f.env}`" not in README]
    assert not missing, f"settings missing from README.md: {missing}"


def test_the_readme_settings_tables_are_the_generated_ones() -> None:
    """`python -m app.settings > table` and paste it under "## Settings" after changing a setting."""
    assert settings_markdown() in README


def test_quick_start_commands() -> None:
    quick = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "make run" in quick and "make test" in quick


def test_the_error_table_lists_every_error_the_code_can_answer() -> None:
    """Every (status, code) of a GatewayError subclass anywhere in app/, and the server guards' canned
    answers (408, 431), has a row in the README's error table; no row names a code that does not exist."""
    import re

    in_code = {(c.status_code, c.code) for c in gateway_error_classes() - {GatewayError}}
    in_code |= {
        (408, "request_timeout"),
        (431, "request_header_fields_too_large"),
    }  # app/server/protocol.py _canned
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


# --- the shell examples (tests/doc_examples.py; run by tests/integration/test_readme_examples.py) -------


def test_every_document_follows_the_example_convention() -> None:
    """Console blocks parse into commands and outputs; markers name a known mode (a skip says why) and sit
    on console blocks; command-only blocks (bash, sh) carry no `$ ` prompt, which would be an example
    that is never run."""
    from tests.doc_examples import ROOT, markdown_files, parse_blocks

    problems = []
    count = 0
    for document in markdown_files():
        for block in parse_blocks((ROOT / document).read_text(), document):
            where = f"{document}:{block.line}"
            count += len(block.examples)
            if block.mode != "run" and block.lang != "console":
                problems.append(f"{where}: an example marker on a {block.lang or 'plain'} block")
            if block.mode == "skip" and not block.reason:
                problems.append(f"{where}: a skipped block says why")
            if block.lang in ("bash", "sh", "shell") and any(line.startswith("$ ") for line in block.body):
                problems.append(f"{where}: `$ ` prompts in a {block.lang} block (make it console: it is run)")
            if block.lang == "console" and not block.examples:
                problems.append(f"{where}: a console block without a `$ ` command")
    assert problems == [], "\n".join(problems)
    assert count >= 30, count


def test_every_shipped_model_has_a_v1_and_a_v2_example_that_runs() -> None:
    from tests.doc_examples import ROOT, documents_with_examples, parse_blocks

    commands = [
        example.command
        for document in documents_with_examples()
        for block in parse_blocks((ROOT / document).read_text(), document)
        if block.mode != "skip"
        for example in block.examples
    ]
    models = sorted(p.name for p in (ROOT / "model_repository").iterdir() if (p / "config.pbtxt").exists())
    assert len(models) >= 5, models
    missing = [
        f"{protocol} {model}"
        for model in models
        for protocol in ("v1", "v2")
        if not any(f"/{protocol}/models/{model}/" in c and "/infer" in c for c in commands)
    ]
    assert missing == [], f"no runnable infer example for: {missing}"


def test_examples_call_only_served_models() -> None:
    """`make run` serves model_repository/ only: an example naming another model (a test model from
    tests/models) would fail for a reader; only the deliberate not-found example names one."""
    import re

    from tests.doc_examples import ROOT, documents_with_examples, parse_blocks

    served = {p.name for p in (ROOT / "model_repository").iterdir()}
    wrong = []
    for document in documents_with_examples():
        for block in parse_blocks((ROOT / document).read_text(), document):
            for example in block.examples:
                for model in re.findall(r"/v[12]/models/([A-Za-z0-9_.-]+)", example.command):
                    if model not in served and '"code":"model_not_found"' not in example.expected:
                        wrong.append(f"{example}: {model}")
    assert wrong == [], "\n".join(wrong)


def test_masks_hide_only_what_varies_and_bind_ids() -> None:
    from tests.doc_examples import Example, bind, bindings, difference, is_read_only, masked

    shown = (
        "date: Sun, 06 Dec 2026 08:15:42 GMT\nx-request-id: d3169393cb9d8f270000000000000005\n"
        "server-timing: cache;dur=0.36, triton;dur=29.26, total;dur=30.40\n"
        '{"id":"4faa527653cd4d2c8897a28a571e5ed1","created_at":"2026-11-30T05:57:13.066Z","retry_after_s":5}'
    )
    printed = (
        "date: Mon, 07 Dec 2026 09:00:00 GMT\nx-request-id: 0123456789abcdef0000000000000001\n"
        "server-timing: cache;dur=1.00, triton;dur=3.00, total;dur=4.50\n"
        '{"id":"0000000000000000000000000000abcd","created_at":"2027-01-01T00:00:00.000Z","retry_after_s":1}'
    )
    assert masked(shown) == masked(printed)
    example = Example("README.md", 1, "curl -s localhost:8080/x", shown)
    assert difference(example, printed) == ""
    assert difference(example, printed.replace("triton;dur=3.00, ", "")) != ""  # a stage is not a timing
    assert difference(example, printed.replace('"retry_after_s"', '"retry_after"')) != ""
    assert masked("x-request-id: demo-1") == "x-request-id: demo-1"  # a chosen id is compared
    bound = bindings(shown, printed)
    assert bound == {"4faa527653cd4d2c8897a28a571e5ed1": "0000000000000000000000000000abcd"}
    assert bind("curl -s localhost:8080/v1/jobs/4faa527653cd4d2c8897a28a571e5ed1", bound).endswith("abcd")
    assert is_read_only("curl -s localhost:8080/v1/jobs/1")
    assert not is_read_only("curl -s localhost:8080/v1/models/m/jobs -d @sine.json")
    assert not is_read_only("tgw keys list")
