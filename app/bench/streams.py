"""Streaming targets of ``tgw bench``: time to the first response and the gap between responses of a
decoupled model (``forecast_stream``), the gateway's doors next to Triton's own, in one run.

Targets (``STREAM_TARGETS``): Triton direct over its HTTP generate extension (``triton-sse``:
``/v2/models/forecast_stream/generate_stream``) and its gRPC ``ModelStreamInfer`` (``triton-grpc``); the
gateway's ``/v2`` generate extension (``gateway-sse``), ``/v1/ws`` (``gateway-ws``) and gRPC
``ModelStreamInfer`` (``gateway-grpc``). Each at every concurrency level as a cache miss (every stream a
series of its own) and, for the gateway, as a replay (the same request again: a completed stream is
replayed from the cache). Closed loop: ``c`` clients, each opening its next stream when the last ended,
spread over ``processes`` generator processes so the client's CPU is not what is measured.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import multiprocessing as mp
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from app.bench.stats import percentile

MODEL = "forecast_stream"
STREAM_TARGETS = ("triton-sse", "triton-grpc", "gateway-sse", "gateway-ws", "gateway-grpc")
STREAM_TARGET_HELP = {
    "triton-sse": "Triton direct: POST /v2/models/forecast_stream/generate_stream (server-sent events)",
    "triton-grpc": "Triton direct: gRPC ModelStreamInfer",
    "gateway-sse": "the gateway's POST /v2/models/forecast_stream/generate_stream",
    "gateway-ws": "the gateway's /v1/ws, one infer frame per stream",
    "gateway-grpc": "the gateway's gRPC ModelStreamInfer",
}
BASE = (50 + 3 * np.sin(2 * np.pi * np.arange(30) / 8) + 0.1 * np.arange(30)).astype(np.float32)


@dataclass(frozen=True)
class StreamTarget:
    name: str
    host: str
    port: int
    replay: bool = False  # the same request every time (a cache replay through the gateway)


@dataclass
class StreamLevel:
    target: str
    replay: bool
    concurrency: int
    streams: int = 0
    errors: int = 0
    first_ms: list[float] = field(default_factory=list)
    gap_ms: list[float] = field(default_factory=list)
    error_samples: list[str] = field(default_factory=list)
    server_cpu_cores: dict[str, float] = field(default_factory=dict)  # per server, over the level's wall time

    def row(self) -> dict[str, Any]:
        first, gaps = sorted(self.first_ms), sorted(self.gap_ms)
        return {
            "target": self.target, "cache": "replay" if self.replay else "miss",
            "concurrency": self.concurrency, "streams": self.streams, "errors": self.errors,
            "first_p50_ms": round(percentile(first, 50), 3), "first_p99_ms": round(percentile(first, 99), 3),
            "gap_p50_ms": round(percentile(gaps, 50), 3), "gap_p99_ms": round(percentile(gaps, 99), 3),
            "error_samples": self.error_samples[:3], "server_cpu_cores": self.server_cpu_cores,
        }  # fmt: skip


def series_for(n: int) -> list[float]:
    """The ``n``-th distinct series (0: the replayed one): ``n`` written exactly into its first two points."""
    values = [float(v) for v in BASE]
    values[0] += n % (1 << 20)
    values[1] += n >> 20
    return values


class _Client:
    """One connection of one target: ``one(series, horizon)`` runs a stream, returning the times (s, from
    sending) of each data response."""

    def __init__(self, target: StreamTarget) -> None:
        self.target = target
        self.http: Any = None
        self.ws: Any = None
        self.stub: Any = None
        self.channel: Any = None
        self.refs = itertools.count(1)

    async def open(self) -> None:
        t = self.target
        if t.name.endswith("-sse"):
            import httpx

            self.http = httpx.AsyncClient(base_url=f"http://{t.host}:{t.port}", timeout=60)
        elif t.name.endswith("-ws"):
            import websockets

            self.ws = await websockets.connect(f"ws://{t.host}:{t.port}/v1/ws", max_size=None)
        else:
            import grpc
            from tritonclient.grpc import service_pb2_grpc

            self.channel = grpc.aio.insecure_channel(f"{t.host}:{t.port}")
            self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        if self.ws is not None:
            await self.ws.close()
        if self.channel is not None:
            await self.channel.close()

    async def one(self, series: list[float], horizon: int) -> list[float]:
        if self.http is not None:
            return await self._sse(series, horizon)
        if self.ws is not None:
            return await self._ws(series, horizon)
        return await self._grpc(series, horizon)

    async def _sse(self, series: list[float], horizon: int) -> list[float]:
        times: list[float] = []
        start = time.perf_counter()
        body = {"series": series, "horizon": horizon}
        async with self.http.stream("POST", f"/v2/models/{MODEL}/generate_stream", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    if '"error"' in line:
                        raise RuntimeError(line[:200])
                    times.append(time.perf_counter() - start)
        return times

    async def _ws(self, series: list[float], horizon: int) -> list[float]:
        ref = next(self.refs)
        frame = {"op": "infer", "ref": ref, "model": MODEL,
                 "inputs": {"series": series, "horizon": [horizon]}}  # fmt: skip
        times: list[float] = []
        start = time.perf_counter()
        await self.ws.send(json.dumps(frame))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("ref") != ref:
                continue  # a heartbeat
            if message.get("type") == "error" or "error" in message:
                raise RuntimeError(str(message)[:200])
            if message.get("outputs") or (message.get("result") or {}).get("outputs"):
                times.append(time.perf_counter() - start)
            if message.get("final", True):
                return times

    async def _grpc(self, series: list[float], horizon: int) -> list[float]:
        from tritonclient.grpc import service_pb2

        request = service_pb2.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="series", datatype="FP32", shape=[len(series)])
        request.inputs.add(name="horizon", datatype="INT32", shape=[1])
        request.raw_input_contents.append(np.asarray(series, np.float32).tobytes())
        request.raw_input_contents.append(np.array([horizon], np.int32).tobytes())
        request.parameters["triton_enable_empty_final_response"].bool_param = True
        times: list[float] = []
        start = time.perf_counter()
        call = self.stub.ModelStreamInfer(timeout=60)
        await call.write(request)
        async for response in call:
            if response.error_message:
                raise RuntimeError(response.error_message[:200])
            if response.infer_response.outputs:
                times.append(time.perf_counter() - start)
            final = response.infer_response.parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                break
        await call.done_writing()
        return times


async def _loop(
    target: StreamTarget, clients: int, first_series: int, horizon: int, warmup_s: float, duration_s: float
) -> dict[str, Any]:
    out: dict[str, Any] = {"first": [], "gaps": [], "streams": 0, "errors": 0, "samples": []}
    counter = itertools.count(first_series)
    begin = time.perf_counter() + warmup_s
    end = begin + duration_s

    async def client() -> None:
        c = _Client(target)
        await c.open()
        try:
            while time.perf_counter() < end:
                started = time.perf_counter()
                try:
                    times = await c.one(series_for(0 if target.replay else next(counter)), horizon)
                except Exception as exc:  # counted and sampled: the report says what failed
                    if started >= begin:
                        out["errors"] += 1
                        if len(out["samples"]) < 3:
                            out["samples"].append(f"{type(exc).__name__}: {exc}"[:300])
                    await asyncio.sleep(0.01)
                    continue
                if started >= begin and time.perf_counter() <= end and times:
                    out["streams"] += 1
                    out["first"].append(times[0] * 1000)
                    out["gaps"] += [(b - a) * 1000 for a, b in itertools.pairwise(times)]
        finally:
            await c.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return out


def _process(args: tuple[StreamTarget, int, int, int, float, float]) -> dict[str, Any]:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    return asyncio.run(_loop(*args))


def measure(
    target: StreamTarget, concurrency: int, horizon: int, warmup_s: float, duration_s: float, processes: int,
    salt: int,
) -> StreamLevel:  # fmt: skip
    """One level: ``concurrency`` closed-loop clients over at most ``processes`` processes."""
    procs = max(1, min(processes, concurrency))
    shares = [concurrency // procs + (1 if i < concurrency % procs else 0) for i in range(procs)]
    jobs = [(target, n, salt + 1_000_000 * i, horizon, warmup_s, duration_s) for i, n in enumerate(shares)]
    with mp.get_context("spawn").Pool(procs) as pool:
        parts = pool.map(_process, jobs)
    level = StreamLevel(target.name, target.replay, concurrency)
    for part in parts:
        level.streams += part["streams"]
        level.errors += part["errors"]
        level.first_ms += part["first"]
        level.gap_ms += part["gaps"]
        level.error_samples += part["samples"]
    return level


def pooled(into: StreamLevel | None, level: StreamLevel) -> StreamLevel:
    """``level``'s samples added to ``into`` (the same target, cache and concurrency in another round)."""
    if into is None:
        return level
    into.streams += level.streams
    into.errors += level.errors
    into.first_ms += level.first_ms
    into.gap_ms += level.gap_ms
    into.error_samples += level.error_samples
    return into


def prime(target: StreamTarget, horizon: int) -> None:
    """Run the replayed request once (so the measured ones are replays)."""
    asyncio.run(_prime(target, horizon))


async def _prime(target: StreamTarget, horizon: int) -> None:
    c = _Client(target)
    await c.open()
    try:
        await c.one(series_for(0), horizon)
        await asyncio.sleep(0.2)  # the cache write lands
    finally:
        await c.close()


def table(levels: Sequence[StreamLevel]) -> str:
    rows = [
        "| target | cache | c | streams | first response p50 / p99 (ms) | gap p50 / p99 (ms) | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        r = lv.row()
        rows.append(
            f"| {r['target']} | {r['cache']} | {r['concurrency']} | {r['streams']} | "
            f"{r['first_p50_ms']:.2f} / {r['first_p99_ms']:.2f} | "
            f"{r['gap_p50_ms']:.3f} / {r['gap_p99_ms']:.3f} | {r['errors']} |"
        )
    return "\n".join(rows)


def checks(levels: Sequence[StreamLevel]) -> list[dict[str, Any]]:
    """The issue's goals, from this run's figures: the gateway adds at most 1 ms to the first response at
    c=1 (each door against Triton's own of the same protocol family), and a replayed stream's first
    response comes sooner than Triton's."""

    def get(target: str, replay: bool, c: int) -> StreamLevel | None:
        return next(
            (lv for lv in levels if (lv.target, lv.replay, lv.concurrency) == (target, replay, c)), None
        )

    out: list[dict[str, Any]] = []
    pairs = [("gateway-sse", "triton-sse"), ("gateway-ws", "triton-sse"), ("gateway-grpc", "triton-grpc")]
    for door, base in pairs:
        a, b = get(door, False, 1), get(base, False, 1)
        if a and b and a.first_ms and b.first_ms:
            added = percentile(sorted(a.first_ms), 50) - percentile(sorted(b.first_ms), 50)
            out.append({"name": f"{door} (miss) vs {base}: added first-response p50 at c=1",
                        "measured": f"{added:.3f} ms", "goal": "<= 1 ms", "met": added <= 1.0})  # fmt: skip
        r = get(door, True, 1)
        if r and b and r.first_ms and b.first_ms:
            replay, triton = percentile(sorted(r.first_ms), 50), percentile(sorted(b.first_ms), 50)
            out.append({"name": f"{door} replay vs {base}: first-response p50 at c=1",
                        "measured": f"{replay:.3f} vs {triton:.3f} ms", "goal": "replay sooner",
                        "met": replay < triton})  # fmt: skip
    return out
