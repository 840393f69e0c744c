"""Model statistics as the gateway answers them (HTTP ``/v2/models[/{m}[/versions/{v}]]/stats`` and gRPC
``ModelStatistics``): Triton's own statistics, one entry per model version summed over every Triton
endpoint, plus the requests that the gateway answered without Triton, counted the way Triton counts the
hits of its own response cache (in ``success``, ``queue`` and ``cache_hit``, not in ``inference_count``
or ``execution_count``; ``last_inference`` moves with them).

Why: tools read these numbers around a measurement, NVIDIA's perf_analyzer among them; it finds the
model version a window measured by the queue count that grew during it, so a window of cache hits
that Triton never saw ended it with "failed to find the requested model version". The counts are
shared by every worker and replica through the cache's Redis (one hash per cache namespace): each
process adds its hits in memory (no Redis call on the request path) and flushes them every
``flush_s`` (0.5 s), so every worker gives the same answer, at most that far behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from app.clients.protocols import TritonAdmin
from app.tasks import stop_task

logger = logging.getLogger(__name__)

# KEYS: the hash. ARGV: triples of (model/version, count, ns) then last-inference ms per triple.
_FLUSH = """
local n = #ARGV / 4
for i = 0, n - 1 do
  local field = ARGV[i * 4 + 1]
  redis.call('HINCRBY', KEYS[1], field .. '|count', ARGV[i * 4 + 2])
  redis.call('HINCRBY', KEYS[1], field .. '|ns', ARGV[i * 4 + 3])
  local last = tonumber(redis.call('HGET', KEYS[1], field .. '|last') or '0')
  if tonumber(ARGV[i * 4 + 4]) > last then redis.call('HSET', KEYS[1], field .. '|last', ARGV[i * 4 + 4]) end
end
return n
"""

_DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output",
              "cache_hit", "cache_miss")  # fmt: skip


def merge_model_stats(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries of the same model version (one per Triton endpoint) summed into one, in the order the
    model versions first appear; the endpoint label a routed client adds is dropped (Triton has none)."""
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in entries:
        entry = {k: v for k, v in entry.items() if k != "endpoint"}
        key = (str(entry.get("name", "")), str(entry.get("version", "")))
        into = merged.get(key)
        if into is None:
            merged[key] = entry
            continue
        into["last_inference"] = max(int(into.get("last_inference", 0)), int(entry.get("last_inference", 0)))
        for name in ("inference_count", "execution_count"):
            into[name] = int(into.get(name, 0)) + int(entry.get(name, 0))
        stats, more = into.setdefault("inference_stats", {}), entry.get("inference_stats", {})
        for name in _DURATIONS:
            a, b = stats.setdefault(name, {"count": 0, "ns": 0}), more.get(name, {})
            a["count"] = int(a.get("count", 0)) + int(b.get("count", 0))
            a["ns"] = int(a.get("ns", 0)) + int(b.get("ns", 0))
        batches = {int(b.get("batch_size", 0)): b for b in into.get("batch_stats", [])}
        for b in entry.get("batch_stats", []):
            size = int(b.get("batch_size", 0))
            if size not in batches:
                batches[size] = b
                continue
            for part in ("compute_input", "compute_infer", "compute_output"):
                x, y = batches[size].setdefault(part, {"count": 0, "ns": 0}), b.get(part, {})
                x["count"] = int(x.get("count", 0)) + int(y.get("count", 0))
                x["ns"] = int(x.get("ns", 0)) + int(y.get("ns", 0))
        if "batch_stats" in into or batches:
            into["batch_stats"] = [batches[s] for s in sorted(batches)]
    return list(merged.values())


class ServedStatistics:
    def __init__(self, admin: TritonAdmin, redis: Any | None, namespace: str, flush_s: float = 0.5) -> None:
        self.admin = admin
        self.redis = redis
        self.key = f"{namespace}:stats:served"
        self.flush_s = flush_s
        self._pending: dict[tuple[str, str], list[int]] = {}  # (model, version) -> [count, ns, last ms]
        self._flush = redis.register_script(_FLUSH) if redis is not None else None
        self._task: asyncio.Task[None] | None = None

    def hit(self, model: str, version: str, ns: int) -> None:
        """A request answered without Triton (its cache, or a call it shared); on the request path: O(1)."""
        if self._flush is None:
            return
        counts = self._pending.get((model, version))
        if counts is None:
            counts = self._pending[(model, version)] = [0, 0, 0]
        counts[0] += 1
        counts[1] += ns
        counts[2] = time.time_ns() // 1_000_000

    async def flush(self) -> None:
        if not self._pending or self._flush is None:
            return
        pending, self._pending = self._pending, {}
        args: list[Any] = []
        for (model, version), (count, ns, last) in pending.items():
            args += [f"{model}/{version}", count, ns, last]
        try:
            await self._flush(keys=[self.key], args=args)
        except Exception as exc:  # kept for the next flush
            for key, (count, ns, last) in pending.items():
                counts = self._pending.setdefault(key, [0, 0, 0])
                counts[0] += count
                counts[1] += ns
                counts[2] = max(counts[2], last)
            logger.debug("served statistics not flushed yet: %s", exc)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_s)
            await self.flush()

    def start(self) -> None:
        if self._flush is not None and self._task is None:
            self._task = asyncio.create_task(self.run(), name="served-statistics")

    async def stop(self) -> None:
        await stop_task(self._task)
        self._task = None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 1.0)

    async def _served(self) -> dict[str, int]:
        if self.redis is None:
            return {}
        try:
            raw = await self.redis.hgetall(self.key)
        except Exception as exc:  # Triton's own numbers, without the gateway's hits
            logger.warning("served statistics unavailable: %s", exc)
            return {}
        out: dict[str, int] = {}
        for k, v in raw.items():
            with contextlib.suppress(ValueError):
                out[k.decode() if isinstance(k, bytes) else str(k)] = int(v)
        return out

    async def answer(self, model: str = "", version: str = "") -> dict[str, Any]:
        """What ``/v2/.../stats`` answers: Triton's statistics, summed over the endpoints, with the
        gateway's answers added; identical on every worker and replica (up to the last flush)."""
        raw, served = await asyncio.gather(self.admin.model_statistics(model, version), self._served())
        entries = merge_model_stats(list(raw.get("model_stats", [])))
        for entry in entries:
            field = f"{entry.get('name', '')}/{entry.get('version', '')}"
            count = served.get(f"{field}|count", 0)
            if not count:
                continue
            ns = served.get(f"{field}|ns", 0)
            stats = entry.setdefault("inference_stats", {})
            for name, add_ns in (("success", ns), ("queue", 0), ("cache_hit", ns)):
                part = stats.setdefault(name, {"count": 0, "ns": 0})
                part["count"] = int(part.get("count", 0)) + count
                part["ns"] = int(part.get("ns", 0)) + add_ns
            entry["last_inference"] = max(int(entry.get("last_inference", 0)), served.get(f"{field}|last", 0))
        return {"model_stats": entries}
