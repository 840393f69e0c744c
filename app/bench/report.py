"""Report writers: ``results.json`` (everything), ``results.csv`` (one row per model/target/level),
``results.md`` (tables and ratios), ``results.png`` (throughput and p99 against concurrency)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from app.bench.stats import LevelResult, ratio

CSV_FIELDS = [
    "model", "target", "concurrency", "duration_s", "requests", "errors", "throughput_rps",
    "p50_ms", "p90_ms", "p99_ms", "max_ms", "mean_ms", "generator_procs", "generator_cpu_cores",
    "generator_cpu_max_pct", "server_cpu_cores", "cache", "error_samples", "triton_inferences",
    "triton_executions", "triton_requests", "batch_formed", "syscalls",
]  # fmt: skip

BASELINE = "triton-http"


def _find(results: Sequence[LevelResult], model: str, target: str, concurrency: int) -> LevelResult | None:
    for r in results:
        if r.model == model and r.target == target and r.concurrency == concurrency:
            return r
    return None


# Each gateway target's Triton-direct counterpart for the cost table (the same model, the same protocol).
COUNTERPART = {
    "gateway-miss": "triton-http", "gateway-hit": "triton-http", "gateway-v2": "triton-http",
    "gateway-v2-bin": "triton-http-bin", "gateway-grpc-miss": "triton-grpc",
    "gateway-grpc-hit": "triton-grpc",
    "gateway-miss-key": "triton-http", "gateway-hit-key": "triton-http",
}  # fmt: skip


def cpu_us_per_request(r: LevelResult, process: str) -> float:
    """CPU time of ``process`` (all its processes: every gateway worker) per answered request, in µs."""
    cores = r.server_cpu_cores.get(process)
    return 1e6 * cores / r.throughput_rps if cores is not None and r.throughput_rps else math.nan


def costs(results: Sequence[LevelResult]) -> list[dict[str, Any]]:
    """The cost per request of each gateway target and level: the gateway's CPU per request (process CPU
    time of every worker over the level / requests), Triton's beside it, system calls per request
    (``--strace``), and the latency it adds over its Triton-direct counterpart measured in the same run."""
    out = []
    for r in results:
        base_name = COUNTERPART.get(r.target)
        if base_name is None:
            continue
        base = _find(results, r.model, base_name, r.concurrency)
        row: dict[str, Any] = {
            "model": r.model, "target": r.target, "concurrency": r.concurrency, "versus": base_name,
            "gateway_cpu_us": round(cpu_us_per_request(r, "gateway"), 1),
            "triton_cpu_us": round(cpu_us_per_request(r, "triton"), 1),
            "syscalls": r.syscalls.get("total"), "syscalls_no_futex": r.syscalls.get("no_futex"),
            "added_p50_ms": round(r.p50_ms - base.p50_ms, 3) if base else None,
            "added_p99_ms": round(r.p99_ms - base.p99_ms, 3) if base else None,
            "throughput_ratio": round(ratio(r.throughput_rps, base.throughput_rps), 3) if base else None,
        }  # fmt: skip
        out.append(row)
    return out


def costs_markdown(rows: Sequence[dict[str, Any]]) -> str:
    def f(v: Any, fmt: str) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    lines = [
        "| model | target | c | gateway CPU µs/req | Triton CPU µs/req | syscalls/req (no futex) "
        "| added p50 ms | added p99 ms | vs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for q in rows:
        sys_text = f(q["syscalls"], ".1f")
        if q["syscalls_no_futex"] is not None:
            sys_text += f" ({q['syscalls_no_futex']:.1f})"
        lines.append(
            f"| {q['model']} | {q['target']} | {q['concurrency']} | {f(q['gateway_cpu_us'], ',.0f')} | "
            f"{f(q['triton_cpu_us'], ',.0f')} | {sys_text} | {f(q['added_p50_ms'], '+.3f')} | "
            f"{f(q['added_p99_ms'], '+.3f')} | {q['versus']} |"
        )
    return "\n".join(lines)


def ratios(results: Sequence[LevelResult], baseline: str = BASELINE) -> list[dict[str, Any]]:
    """Per model, target and level: throughput / baseline's, and p50/p99 added over the baseline."""
    out = []
    for r in results:
        if r.target == baseline:
            continue
        base = _find(results, r.model, baseline, r.concurrency)
        if base is None:
            continue
        out.append(
            {
                "model": r.model,
                "target": r.target,
                "concurrency": r.concurrency,
                "throughput_ratio": round(ratio(r.throughput_rps, base.throughput_rps), 3),
                "added_p50_ms": round(r.p50_ms - base.p50_ms, 3),
                "added_p99_ms": round(r.p99_ms - base.p99_ms, 3),
            }
        )
    return out


def write_json(path: Path, results: Sequence[LevelResult], meta: dict[str, Any]) -> None:
    doc = {
        **meta,
        "results": [r.row() | {"cache": r.cache, "server_cpu_cores": r.server_cpu_cores} for r in results],
        "ratios": ratios(results),
        "costs": costs(results),
    }
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def write_csv(path: Path, results: Sequence[LevelResult]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in results:
            writer.writerow({k: v for k, v in r.row().items() if k in CSV_FIELDS})


def _fmt(x: float, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def markdown(results: Sequence[LevelResult], meta: dict[str, Any] | None = None) -> str:
    lines: list[str] = []
    models = list(dict.fromkeys(r.model for r in results))
    for model in models:
        rows = [r for r in results if r.model == model]
        lines += [
            f"### {model}",
            "",
            "| target | conc. | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | x triton-http "
            "| gen CPU (cores) | batch formed |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            base = _find(results, model, BASELINE, r.concurrency)
            rel = _fmt(ratio(r.throughput_rps, base.throughput_rps)) if base else "-"
            lines.append(
                f"| {r.target} | {r.concurrency} | {r.throughput_rps:,.0f} | {_fmt(r.p50_ms)} | "
                f"{_fmt(r.p90_ms)} | {_fmt(r.p99_ms)} | {_fmt(r.max_ms)} | {r.errors} | {rel} | "
                f"{r.generator_cpu_cores:.2f} | {_fmt(r.batch_formed, 1)} |"
            )
        lines.append("")
    cost_rows = costs(results)
    if cost_rows:
        lines += ["### Cost per request", "", costs_markdown(cost_rows), ""]
    if meta and meta.get("targets_check"):
        lines += ["### Targets", "", "| target | measured | goal | met |", "|---|---:|---:|---|"]
        for t in meta["targets_check"]:
            lines.append(f"| {t['name']} | {t['measured']} | {t['goal']} | {'yes' if t['met'] else 'no'} |")
        lines.append("")
    return "\n".join(lines)


def write_markdown(path: Path, results: Sequence[LevelResult], meta: dict[str, Any] | None = None) -> None:
    path.write_text(markdown(results, meta))


def write_plot(path: Path, results: Sequence[LevelResult]) -> bool:
    """Throughput and p99 against concurrency, one line per target, one row of plots per model.
    Returns False (and writes nothing) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = list(dict.fromkeys(r.model for r in results))
    if not models:
        return False
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        ax_tp, ax_p99 = axes[row]
        for target in dict.fromkeys(r.target for r in results if r.model == model):
            pts = sorted((r for r in results if r.model == model and r.target == target),
                         key=lambda r: r.concurrency)  # fmt: skip
            xs = [r.concurrency for r in pts]
            ax_tp.plot(xs, [r.throughput_rps for r in pts], marker="o", label=target)
            ax_p99.plot(xs, [r.p99_ms for r in pts], marker="o", label=target)
        for ax, title in ((ax_tp, "throughput (req/s)"), (ax_p99, "p99 latency (ms)")):
            if min(r.concurrency for r in results) > 0:
                ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency (connections)")
            ax.set_title(f"{model}: {title}", fontsize=10)
            ax.grid(True, alpha=0.3)
        if any(r.p99_ms > 0 for r in results if r.model == model):
            ax_p99.set_yscale("log")
        ax_tp.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
