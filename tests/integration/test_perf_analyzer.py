"""NVIDIA's perf_analyzer against the gateway's /v2 door, as a Triton user runs it (issue 19, item 18):
``tgw serve`` with two workers, concurrency 1 and 64, each run twice. The second runs are answered from
the gateway's cache alone; before, perf_analyzer read the statistics around each window, found no request
that Triton saw and stopped with "failed to find the requested model version".

Runs where the binary is: TGW_PERF_ANALYZER, else .tgw/perf_analyzer/perf_analyzer
(``scripts/install_perf_analyzer.sh`` puts it there), else perf_analyzer on PATH; skipped otherwise."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from app.launcher import EmbeddedRedis, EmbeddedTriton
from tests.integration.serve_workers import serving_workers

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _binary() -> str | None:
    for candidate in (
        os.environ.get("TGW_PERF_ANALYZER"),
        str(ROOT / ".tgw" / "perf_analyzer" / "perf_analyzer"),
        shutil.which("perf_analyzer"),
    ):
        if candidate and Path(candidate).is_file():
            probe = subprocess.run([candidate, "--version"], capture_output=True, text=True, timeout=30)
            if "Perf Analyzer Version" in probe.stdout + probe.stderr:
                return candidate
    return None


PERF_ANALYZER = _binary()


needs_perf_analyzer = pytest.mark.skipif(
    PERF_ANALYZER is None,
    reason="perf_analyzer not found (TGW_PERF_ANALYZER, .tgw/perf_analyzer or PATH): run "
    "scripts/install_perf_analyzer.sh and apt-get install libb64-0d",
)


@needs_perf_analyzer
def test_perf_analyzer_runs_at_every_concurrency_against_several_workers(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    assert PERF_ANALYZER is not None
    namespace = f"perf-{uuid.uuid4().hex[:8]}"
    with serving_workers(
        triton, redis_server, tmp_path / "tgw.log", workers=2, TGW_CACHE_NAMESPACE=namespace
    ) as url:
        runs = []
        for concurrency in (1, 64, 1, 64):  # the later runs: every answer from the gateway's cache
            out = subprocess.run(
                [
                    PERF_ANALYZER, "-m", "identity_fp32", "-u", url.removeprefix("http://"), "-i", "http",
                    "--shape", "INPUT0:4", "--concurrency-range", str(concurrency),
                    "-p", "1000", "--stability-percentage", "100", "--max-trials", "10",
                ],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            text = out.stdout + out.stderr
            print(f"perf_analyzer c={concurrency}: rc {out.returncode}; " + " ".join(
                line.strip() for line in text.splitlines() if "Throughput" in line or "Avg latency" in line
            ))  # fmt: skip
            runs.append((concurrency, out.returncode, text))
    for concurrency, rc, text in runs:
        assert rc == 0, f"c={concurrency}: {text[-1500:]}"
        assert "failed to find the requested model version" not in text
        throughput = re.search(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec", text)
        assert throughput and float(throughput.group(1)) > 0, text[-1500:]
        served = re.search(r"Server:\s+Inference count: (\d+)\s+Execution count: (\d+)\s+"
                           r"Successful request count: (\d+)", text)  # fmt: skip
        assert served and int(served.group(3)) > 0, text[-1500:]  # the server side saw the requests


@needs_perf_analyzer
def test_perf_analyzer_runs_over_the_grpc_door(gateway_grpc: str) -> None:
    """`-i grpc`: perf_analyzer sends triton_enable_empty_final_response with every request, a flag of
    Triton's gRPC stream that Triton's own front end consumes; the gateway consumes it too (it was passed
    on as a parameter, and Triton refused every request)."""
    assert PERF_ANALYZER is not None
    for concurrency in (1, 64):
        out = subprocess.run(
            [
                PERF_ANALYZER, "-m", "identity_fp32", "-u", gateway_grpc, "-i", "grpc", "--shape", "INPUT0:4",
                "--concurrency-range", str(concurrency), "-p", "1000", "--stability-percentage", "100",
                "--max-trials", "10",
            ],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        text = out.stdout + out.stderr
        assert out.returncode == 0, f"c={concurrency}: {text[-1500:]}"
        throughput = re.search(r"Concurrency: \d+, throughput: ([\d.]+) infer/sec", text)
        assert throughput and float(throughput.group(1)) > 0, text[-1500:]
