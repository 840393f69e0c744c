"""``python -m app.bench.transport``: the cost of one inference call to Triton from Python, per client.

Starts the embedded Triton on ``tests/models`` (same launcher as ``tgw up``) and times ``identity_fp32``
calls (``[1,16]`` FP32) made by: the gateway's own two upstream clients (``TritonHttpInfer``, the default,
and ``TritonGrpcClient``), and for comparison ``tritonclient.grpc.aio``, ``tritonclient.http.aio``,
``httpx`` with a pre-built binary request, and a plain ``aiohttp`` session with the same request encoding
and answer decoding as ``TritonHttpInfer`` (only the HTTP layer differs). Sequentially (concurrency 1)
and with 64 calls in flight, on uvloop; prints calls/s, p50/p99 and the client process's CPU per call
(``getrusage``). This is the measurement behind ``app/clients/triton_http.py`` (docs/performance.md,
"Transport to Triton").
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import orjson

from app.launcher import EmbeddedTriton, free_port

ROOT = Path(__file__).resolve().parents[2]
MODEL, INPUT, OUTPUT = "identity_fp32", "INPUT0", "OUTPUT0"
X = np.arange(16, dtype=np.float32).reshape(1, 16)

Call = Callable[[], Awaitable[object]]


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _measure(name: str, call: Call, n: int, concurrency: int) -> str:
    for _ in range(100):  # warm-up: connections, caches
        await call()
    latencies: list[float] = []

    async def worker(k: int) -> None:
        for _ in range(k):
            t = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t)

    c0, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(worker(n // concurrency) for _ in range(concurrency)))
    elapsed, cpu = time.perf_counter() - t0, _cpu() - c0
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.99)]
    return (
        f"{name:34s} c={concurrency:<3d} {len(latencies) / elapsed:8,.0f} calls/s  p50 {p50 * 1e3:6.3f} ms  "
        f"p99 {p99 * 1e3:6.3f} ms  client CPU {cpu / len(latencies) * 1e6:6.0f} µs/call"
    )


async def _run(triton: EmbeddedTriton, n: int) -> None:
    import aiohttp
    import httpx
    import tritonclient.grpc.aio as grpcclient
    import tritonclient.http.aio as httpclient

    from app.clients.protocols import TritonCall
    from app.clients.triton import TritonGrpcClient
    from app.clients.triton_http import TritonHttpInfer
    from app.clients.triton_http import _decode as decode_answer
    from app.frontends.kserve_http import binary

    grpc_gw = TritonGrpcClient(triton.grpc_url)
    http_gw = TritonHttpInfer(triton.http_url)
    tc_grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    tc_http = httpclient.InferenceServerClient(triton.http_url.removeprefix("http://"), conn_limit=128)
    hx = httpx.AsyncClient(limits=httpx.Limits(max_connections=128, max_keepalive_connections=128))
    tensor = {"name": INPUT, "shape": [1, 16], "datatype": "FP32", "parameters": {"binary_data_size": 64}}
    head = orjson.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}})
    url = f"{triton.http_url}/v2/models/{MODEL}/infer"
    headers = {"Inference-Header-Content-Length": str(len(head)), "Content-Type": "application/octet-stream"}

    def make_call() -> TritonCall:
        return TritonCall(MODEL, "", {INPUT: X}, {INPUT: "FP32"}, deadline=time.monotonic() + 10)

    async def gateway_http() -> object:
        return await http_gw.infer(make_call())

    async def gateway_grpc() -> object:
        return await grpc_gw.infer(make_call())

    async def tritonclient_grpc() -> object:
        tensor = grpcclient.InferInput(INPUT, [1, 16], "FP32")
        tensor.set_data_from_numpy(X)
        return (await tc_grpc.infer(MODEL, [tensor])).as_numpy(OUTPUT)

    async def tritonclient_http() -> object:
        tensor = httpclient.InferInput(INPUT, [1, 16], "FP32")
        tensor.set_data_from_numpy(X, binary_data=True)
        out = [httpclient.InferRequestedOutput(OUTPUT, binary_data=True)]
        return (await tc_http.infer(MODEL, [tensor], outputs=out)).as_numpy(OUTPUT)

    connector = aiohttp.TCPConnector(limit=128, ttl_dns_cache=None)
    session = aiohttp.ClientSession(connector=connector)

    async def aiohttp_raw() -> object:
        """A plain aiohttp session doing what TritonHttpInfer does: the same request encoding (the
        shared KServe binary codec) and the same answer decoding, only the HTTP layer differs."""
        call = make_call()
        blobs: list[binary.Blob] = []
        tensors = [binary.binary_item(n, call.datatypes[n], a, blobs) for n, a in call.inputs.items()]
        header = {"inputs": tensors, "parameters": {"binary_data_output": True}}
        body, head_length = binary.pack(header, blobs)
        headers = {"Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": str(head_length)}  # fmt: skip
        async with session.post(url, data=body, headers=headers) as r:
            raw = await r.read()
            answer_headers = {k.lower().encode(): v.encode() for k, v in r.headers.items()}
        return decode_answer(answer_headers, bytearray(raw))  # as our client holds an answer

    async def httpx_raw() -> object:
        return (await hx.post(url, content=head + X.tobytes(), headers=headers)).content

    clients: list[tuple[str, Call]] = [
        ("gateway TritonHttpInfer (default)", gateway_http),
        ("gateway TritonGrpcClient", gateway_grpc),
        ("tritonclient.grpc.aio", tritonclient_grpc),
        ("tritonclient.http.aio (aiohttp)", tritonclient_http),
        ("aiohttp session, same codec", aiohttp_raw),
        ("httpx, pre-built binary body", httpx_raw),
    ]
    try:
        for concurrency in (1, 64):
            for name, call in clients:
                print(await _measure(name, call, n if concurrency == 1 else 3 * n, concurrency), flush=True)
    finally:
        await http_gw.close()
        await grpc_gw.close()
        await tc_grpc.close()
        await tc_http.close()
        await hx.aclose()
        await session.close()


def main() -> None:
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=2000, help="calls per client at c=1 (x3 at c=64)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        triton = EmbeddedTriton([ROOT / "tests" / "models"], free_port(), free_port(), free_port(), Path(tmp))
        triton.start(timeout=180)
        try:
            uvloop.run(_run(triton, args.calls))
        finally:
            triton.stop()


if __name__ == "__main__":
    main()
