"""``tgw bench --quick`` end to end against the real embedded stack (its own, on free ports)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_bench_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    targets = {(r["target"], r["concurrency"]) for r in doc["results"]}
    assert {("triton-http", 1), ("gateway-miss", 1), ("gateway-hit", 16)} <= targets
    for r in doc["results"]:
        assert r["requests"] > 0 and r["errors"] == 0, r
    miss = [r for r in doc["results"] if r["target"] == "gateway-miss"]
    assert all(set(r["cache"]) == {"MISS"} for r in miss)  # unique inputs never hit
    assert len(list(csv.DictReader((tmp_path / "results.csv").open()))) == len(doc["results"])
    assert "| gateway-hit |" in (tmp_path / "results.md").read_text()
