"""Merge the GPU run's bench results into ``<out>/results.json`` and ``<out>/summary.md``: the tables of
docs/performance.md ("On a GPU") and the issue-14 targets, each met or not.

    python scripts/gpu/summarize.py WORK_DIR OUT_DIR   (WORK_DIR holds main/, eager/, nobatch/ from tgw bench)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def load(work: Path, name: str) -> dict[str, Any]:
    path = work / name / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def get(doc: dict[str, Any], target: str, c: int) -> Row | None:
    return next((r for r in doc.get("results", []) if r["target"] == target and r["concurrency"] == c), None)


def fmt(x: float | None, d: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{d}f}"


def row(label: str, r: Row | None) -> str:
    if r is None:
        return f"| {label} | - | - | - | - | - | - | - |"
    return (
        f"| {label} | {r['concurrency']} | {r['throughput_rps']:,.0f} | {fmt(r['p50_ms'])} "
        f"| {fmt(r['p99_ms'])} "
        f"| {r['errors']} | {fmt(r.get('batch_formed'), 1)} | {req_per_exec(r)} |"
    )


def req_per_exec(r: Row) -> str:
    n, e = r.get("triton_requests") or 0, r.get("triton_executions") or 0
    return f"{n / e:.1f}" if e else "-"


HEAD = [
    "| target | c | req/s | p50 ms | p99 ms | errors | rows / execution | requests / execution |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
]


def main() -> int:
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    docs = {n: load(work, n) for n in ("main", "eager", "nobatch", "eager_nobatch", "nocache")}
    main_doc = docs["main"]
    opts = main_doc.get("options", {})
    lines = ["# GPU run summary", ""]
    if main_doc:
        m = main_doc.get("machine", {})
        lines += [
            f"Machine: {m.get('cpu_model')} ({m.get('logical_cpus')} logical CPUs), Triton "
            f"{main_doc.get('triton_version')}, configs `{main_doc.get('model_config_name')}`, gateway "
            f"workers {opts.get('workers')}, {opts.get('generators')} generator processes, "
            f"{opts.get('duration_s')} s per level (+{opts.get('warmup_s')} s warm-up).",
            "",
        ]
    levels = sorted({r["concurrency"] for r in main_doc.get("results", [])})
    lines += ["## Triton direct vs the gateway (CUDA graphs + dynamic batching)", "", *HEAD]
    for target in ("triton-http", "gateway-miss", "gateway-hit"):
        for c in levels:
            lines.append(row(target, get(main_doc, target, c)))
    lines += ["", "## CUDA graphs vs eager; dynamic batching on vs off (Triton direct HTTP)", "", *HEAD]
    for label, doc in (
        ("gpu (graphs, batching)", main_doc),
        ("gpu_eager (eager, batching)", docs["eager"]),
        ("gpu_nobatch (graphs, no batching)", docs["nobatch"]),
        ("gpu_eager_nobatch (eager, no batching)", docs["eager_nobatch"]),
    ):
        for c in (1, 64):
            lines.append(row(label, get(doc, "triton-http", c)))
    if docs["nocache"]:
        lines += ["", "## The gateway at c=1 with its Redis cache off (TGW_CACHE_ENABLED=false)", "", *HEAD]
        for target in ("triton-http", "gateway-miss"):
            lines.append(row(target, get(docs["nocache"], target, 1)))
    checks: list[tuple[str, str, str, bool]] = []

    g1, e1 = get(main_doc, "triton-http", 1), get(docs["eager"], "triton-http", 1)
    if g1 is not None and e1 is not None:
        v = e1["p50_ms"] / g1["p50_ms"]
        checks.append(
            ("CUDA graphs: eager p50 / graphs p50, Triton direct c=1", f"{v:.2f}x", ">= 2x", v >= 2)
        )
    b64, n64 = get(main_doc, "triton-http", 64), get(docs["nobatch"], "triton-http", 64)
    if b64 is not None and n64 is not None:
        v = b64["throughput_rps"] / n64["throughput_rps"]
        checks.append(("dynamic batching: on / off throughput, c=64 (graphs)", f"{v:.1f}x", ">= 8x", v >= 8))
    e64, en64 = get(docs["eager"], "triton-http", 64), get(docs["eager_nobatch"], "triton-http", 64)
    if e64 is not None and en64 is not None:
        v = e64["throughput_rps"] / en64["throughput_rps"]
        checks.append(("dynamic batching: on / off throughput, c=64 (eager)", f"{v:.1f}x", ">= 8x", v >= 8))
    for c in (64, 256):
        gm, th = get(main_doc, "gateway-miss", c), get(main_doc, "triton-http", c)
        if gm is not None and th is not None:
            v = gm["throughput_rps"] / th["throughput_rps"]
            checks.append((f"gateway misses / Triton direct, c={c}", f"{v:.2f}x", ">= 0.9x", v >= 0.9))
    gm1, th1 = get(main_doc, "gateway-miss", 1), get(main_doc, "triton-http", 1)
    if gm1 is not None and th1 is not None:
        d = gm1["p50_ms"] - th1["p50_ms"]
        checks.append(("gateway added p50 at c=1 (miss)", f"{d:.3f} ms", "<= 0.3 ms", d <= 0.3))
    errors = sum(r["errors"] for doc in docs.values() for r in doc.get("results", []))
    checks.append(("errors, every level", str(errors), "0", errors == 0))
    lines += ["", "## Targets (issue 14)", "", "| target | measured | goal | met |", "|---|---:|---:|---|"]
    lines += [f"| {n} | {m} | {g} | {'yes' if ok else 'NO'} |" for n, m, g, ok in checks]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    (out / "results.json").write_text(json.dumps(docs, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
