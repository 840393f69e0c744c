"""Pure result arithmetic: percentiles, merging generator shards, ratios."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``q`` in 0..100); NaN for no values."""
    if not sorted_values:
        return math.nan
    if q <= 0:
        return float(sorted_values[0])
    rank = math.ceil(q / 100.0 * len(sorted_values))
    return float(sorted_values[min(max(rank, 1), len(sorted_values)) - 1])


@dataclass
class Shard:
    """What one generator process measured in the window of one level."""

    latencies_us: list[float]
    errors: int = 0
    cache: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0


@dataclass
class LevelResult:
    model: str
    target: str
    concurrency: int
    duration_s: float
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    generator_procs: int
    generator_cpu_cores: float  # sum over generator processes of CPU seconds / wall seconds
    generator_cpu_max_pct: float  # the busiest generator process, percent of one core
    cache: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    server_cpu_cores: dict[str, float] = field(default_factory=dict)  # gateway/triton/redis, this level
    # Triton's own statistics over the level (warm-up included): requests it ran and model executions.
    triton_inferences: int = 0
    triton_executions: int = 0
    triton_requests: int = 0
    # --strace: system calls per request of the gateway's processes over a separate short pass (total, and
    # without futex, which counts the waits of idle threads); empty without --strace.
    syscalls: dict[str, float] = field(default_factory=dict)

    @property
    def batch_formed(self) -> float:
        """Rows per execution: the average batch Triton's dynamic batcher formed (NaN: no stats). A gateway
        that stacks rows into one request sends fewer, larger requests: see ``triton_requests``."""
        return self.triton_inferences / self.triton_executions if self.triton_executions else math.nan

    def row(self) -> dict[str, Any]:
        out = asdict(self)
        out["cache"] = ";".join(f"{k}={v}" for k, v in sorted(self.cache.items()))
        out["server_cpu_cores"] = ";".join(f"{k}={v:.2f}" for k, v in sorted(self.server_cpu_cores.items()))
        out["error_samples"] = " | ".join(self.error_samples[:3])
        out["batch_formed"] = round(self.batch_formed, 2) if self.triton_executions else None
        out["syscalls"] = ";".join(f"{k}={v:.1f}" for k, v in sorted(self.syscalls.items()))
        return out


def merge(
    model: str, target: str, concurrency: int, duration_s: float, shards: Sequence[Shard]
) -> LevelResult:
    lat = sorted(v for s in shards for v in s.latencies_us)
    errors = sum(s.errors for s in shards)
    cache: dict[str, int] = {}
    for s in shards:
        for k, v in s.cache.items():
            cache[k] = cache.get(k, 0) + v
    samples = [e for s in shards for e in s.error_samples][:5]
    n = len(lat)
    cores = sum(s.cpu_s / s.wall_s for s in shards if s.wall_s > 0)
    busiest = max((s.cpu_s / s.wall_s for s in shards if s.wall_s > 0), default=0.0)
    return LevelResult(
        model=model,
        target=target,
        concurrency=concurrency,
        duration_s=duration_s,
        requests=n,
        errors=errors,
        throughput_rps=n / duration_s if duration_s > 0 else 0.0,
        p50_ms=percentile(lat, 50) / 1000,
        p90_ms=percentile(lat, 90) / 1000,
        p99_ms=percentile(lat, 99) / 1000,
        max_ms=(lat[-1] / 1000) if lat else math.nan,
        mean_ms=(sum(lat) / n / 1000) if n else math.nan,
        generator_procs=len(shards),
        generator_cpu_cores=round(cores, 3),
        generator_cpu_max_pct=round(100 * busiest, 1),
        cache=cache,
        error_samples=samples,
    )


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


def triton_counts(stats: dict[str, Any]) -> tuple[int, int, int]:
    """``(inference_count, execution_count, requests)`` over the versions in a ``/v2/models/{m}/stats``
    answer: rows inferred, model executions, and requests answered (``inference_stats.success.count``)."""
    inferences = executions = requests = 0
    for m in stats.get("model_stats", []):
        inferences += int(m.get("inference_count", 0))
        executions += int(m.get("execution_count", 0))
        requests += int(m.get("inference_stats", {}).get("success", {}).get("count", 0))
    return inferences, executions, requests
