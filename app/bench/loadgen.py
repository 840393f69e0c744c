"""The load generator: persistent worker processes, each running a closed loop of connections.

HTTP connections are raw ``asyncio.Protocol``s on uvloop (HTTP/1.1 keep-alive, a response parsed only as
far as status, Content-Length and X-Cache): the next request is written from ``data_received``, with no
task switch, so a generator process costs a few microseconds per request. gRPC uses ``grpc.aio`` with
pre-serialised requests and undecoded responses. Each process measures its own CPU time
(``resource.getrusage``) over the measurement window, so the report shows whether the generator was busy.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from typing import Any, cast

from app.bench.payloads import TargetSpec, grpc_request_factory, http_request_factory
from app.bench.stats import Shard

_NS = 1_000_000_000


@dataclass
class Job:
    target: TargetSpec
    conn_ids: list[int]
    start_ns: int  # CLOCK_MONOTONIC (shared by all processes on Linux)
    warmup_s: float
    duration_s: float


class _Window:
    """Collects what completes inside [start, end)."""

    def __init__(self, start_ns: int, end_ns: int) -> None:
        self.start_ns = start_ns
        self.end_ns = end_ns
        self.running = True
        self.latencies: list[float] = []
        self.errors = 0
        self.cache: dict[str, int] = {}
        self.samples: list[str] = []
        self.inflight = 0

    def record(self, t0: int, t1: int, ok: bool, cache: str | None, sample: str | None) -> None:
        if t0 < self.start_ns or t1 > self.end_ns:
            return
        if ok:
            self.latencies.append((t1 - t0) / 1000)
            if cache:
                self.cache[cache] = self.cache.get(cache, 0) + 1
        else:
            self.errors += 1
            if sample and len(self.samples) < 3:
                self.samples.append(sample)


class _HttpConn(asyncio.Protocol):
    def __init__(self, make: Callable[[int], bytes], window: _Window, done: asyncio.Future[None]) -> None:
        self.make = make
        self.window = window
        self.done = done
        self.buf = bytearray()
        self.seq = 0
        self.t0 = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if not self.window.running:
            self.transport.close()
            return
        self.seq += 1
        self.t0 = time.monotonic_ns()
        self.transport.write(self.make(self.seq))

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        header = bytes(buf[:end]).lower()
        i = header.find(b"\r\ncontent-length:")
        if i < 0:
            if b"transfer-encoding: chunked" in header:
                stop = buf.find(b"\r\n0\r\n\r\n", end)
                if stop < 0:
                    return
                need = stop + 7
            else:
                need = end + 4
        else:
            j = header.find(b"\r\n", i + 2)
            need = end + 4 + int(header[i + 17 : j if j > 0 else len(header)])
        if len(buf) < need:
            return
        t1 = time.monotonic_ns()
        status = int(header[9:12])
        cache = None
        k = header.find(b"\r\nx-cache:")
        if k >= 0:
            stop = header.find(b"\r\n", k + 2)
            cache = header[k + 10 : stop if stop > 0 else len(header)].strip().decode().upper()
        ok = status == 200
        sample = None if ok else f"HTTP {status}: {bytes(buf[end + 4 : need])[:160].decode(errors='replace')}"
        del buf[:need]
        self.window.record(self.t0, t1, ok, cache, sample)
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _run_http(job: Job, window: _Window) -> None:
    loop = asyncio.get_running_loop()
    t = job.target
    dones: list[asyncio.Future[None]] = []
    transports = []
    for cid in job.conn_ids:
        done: asyncio.Future[None] = loop.create_future()
        make = http_request_factory(t, cid)
        transport, _ = await loop.create_connection(partial(_HttpConn, make, window, done), t.host, t.port)
        transports.append(transport)
        dones.append(done)
    await _clock(job, window)
    try:
        await asyncio.wait_for(asyncio.gather(*dones), timeout=10)
    except TimeoutError:
        for tr in transports:
            tr.abort()


async def _run_grpc(job: Job, window: _Window) -> None:
    import grpc

    t = job.target
    channels = [
        grpc.aio.insecure_channel(f"{t.host}:{t.port}", options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(min(len(job.conn_ids), 4))
    ]
    calls = [ch.unary_unary("/inference.GRPCInferenceService/ModelInfer") for ch in channels]

    async def loop_one(i: int, cid: int) -> None:
        call = calls[i % len(calls)]
        make = grpc_request_factory(t, cid)
        seq = 0
        while window.running:
            seq += 1
            body = make(seq)
            t0 = time.monotonic_ns()
            try:
                await call(body, timeout=30)
            except grpc.aio.AioRpcError as exc:
                window.record(t0, time.monotonic_ns(), False, None, f"{exc.code().name}: {exc.details()}")
            else:
                window.record(t0, time.monotonic_ns(), True, None, None)

    tasks = [asyncio.create_task(loop_one(i, cid)) for i, cid in enumerate(job.conn_ids)]
    await _clock(job, window)
    await asyncio.wait(tasks, timeout=10)
    for ch in channels:
        await ch.close()


_cpu_marks: list[float] = []


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _clock(job: Job, window: _Window) -> None:
    """Sleep to the window start, take the CPU mark, sleep to the end, take it again, stop the loop."""
    now = time.monotonic_ns()
    await asyncio.sleep(max(0.0, (window.start_ns - now) / _NS))
    _cpu_marks[:] = [_cpu(), time.monotonic()]
    await asyncio.sleep(max(0.0, (window.end_ns - time.monotonic_ns()) / _NS))
    _cpu_marks[:] = [_cpu() - _cpu_marks[0], time.monotonic() - _cpu_marks[1]]
    window.running = False


def run_job(job: Job) -> Shard:
    start = job.start_ns + int(job.warmup_s * _NS)
    window = _Window(start, start + int(job.duration_s * _NS))
    if job.target.kind == "grpc":
        asyncio.run(_run_grpc(job, window))
    else:
        import uvloop

        uvloop.run(_run_http(job, window))
    cpu_s, wall_s = _cpu_marks if len(_cpu_marks) == 2 else (0.0, 0.0)
    return Shard(window.latencies, window.errors, window.cache, window.samples, cpu_s, wall_s)


def _worker(conn: Connection) -> None:
    while True:
        job = conn.recv()
        if job is None:
            return
        try:
            conn.send(run_job(job))
        except Exception as exc:  # report it rather than hang the runner
            conn.send(Shard([], errors=1, error_samples=[f"generator failed: {type(exc).__name__}: {exc}"]))


class Generator:
    """``procs`` persistent generator processes (spawned, so nothing of the parent leaks in)."""

    def __init__(self, procs: int) -> None:
        ctx = mp.get_context("spawn")
        self._pipes: list[Connection] = []
        self._next_conn = 0
        self._procs: list[Any] = []
        for i in range(procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(child,), name=f"tgw-bench-gen-{i}", daemon=True)
            p.start()
            self._pipes.append(parent)
            self._procs.append(p)

    @property
    def procs(self) -> int:
        return len(self._procs)

    def pids(self) -> list[int]:
        return [int(p.pid) for p in self._procs]

    def run(self, target: TargetSpec, concurrency: int, warmup_s: float, duration_s: float) -> list[Shard]:
        """Spread ``concurrency`` connections over the processes, run one level, return each one's shard."""
        # Connection ids are never reused within a run: a unique target stays unique across levels.
        split = [[self._next_conn + i for i in ids] for ids in spread(concurrency, len(self._pipes))]
        self._next_conn += concurrency
        start_ns = time.monotonic_ns() + int(0.3 * _NS)  # time for every process to connect
        for pipe, ids in zip(self._pipes, split, strict=False):
            pipe.send(Job(target, ids, start_ns, warmup_s, duration_s))
        return [pipe.recv() for pipe in self._pipes[: len(split)]]

    def close(self) -> None:
        for pipe in self._pipes:
            try:
                pipe.send(None)
            except OSError:
                pass
        for p in self._procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()


def spread(concurrency: int, procs: int) -> Sequence[list[int]]:
    used = min(concurrency, procs)
    return [list(range(i, concurrency, used)) for i in range(used)]
