"""The floor of a Python gRPC front door: bare servers answering ``ModelInfer`` (echoing the request's
tensor), measured side by side with one client, so the gateway's gRPC door can be weighed against what its
server library alone costs (docs/performance.md, "gRPC servers in Python").

Servers (each its own process, uvloop where it runs an event loop):
  grpc.aio   -- what the gateway's door uses (``grpc.aio.server``)
  grpc-sync  -- grpcio's thread-pool server (``grpc.server(ThreadPoolExecutor(8))``)
  grpclib    -- the asyncio gRPC server on h2 (``pip install grpclib``; skipped when missing)
Client: ``grpc.aio`` stubs in their own process: c=1 sequential (p50 latency) and c=16 for a few seconds
(requests/s); the server's CPU time per request from /proc.

  .venv/bin/python scripts/grpc_servers.py [--seconds 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tritonclient.grpc import service_pb2, service_pb2_grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _answer(request: Any) -> Any:
    response = service_pb2.ModelInferResponse(model_name=request.model_name, id=request.id)
    for tensor in request.inputs:
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
    response.raw_output_contents.extend(request.raw_input_contents)
    return response


class _Aio(service_pb2_grpc.GRPCInferenceServiceServicer):
    async def ModelInfer(self, request: Any, context: Any) -> Any:
        return _answer(request)


class _Sync(service_pb2_grpc.GRPCInferenceServiceServicer):
    def ModelInfer(self, request: Any, context: Any) -> Any:
        return _answer(request)


def _serve(kind: str, port: int, ready: Any) -> None:
    import grpc

    if kind == "grpc-sync":
        server = grpc.server(ThreadPoolExecutor(8))
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Sync(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        ready.set()
        server.wait_for_termination()
        return
    import uvloop

    async def run() -> None:
        if kind == "grpc.aio":
            aio = grpc.aio.server()
            service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_Aio(), aio)
            aio.add_insecure_port(f"127.0.0.1:{port}")
            await aio.start()
            ready.set()
            await aio.wait_for_termination()
        else:
            from grpclib.const import Cardinality, Handler
            from grpclib.server import Server

            class Service:
                async def infer(self, stream: Any) -> None:
                    request = await stream.recv_message()
                    await stream.send_message(_answer(request))

                def __mapping__(self) -> dict[str, Any]:
                    types = (service_pb2.ModelInferRequest, service_pb2.ModelInferResponse)
                    return {METHOD: Handler(self.infer, Cardinality.UNARY_UNARY, *types)}

            lib = Server([Service()])
            await lib.start("127.0.0.1", port)
            ready.set()
            await lib.wait_closed()

    uvloop.run(run())


def _request() -> Any:
    request = service_pb2.ModelInferRequest(model_name="transformer_timeseries", id="r")
    request.inputs.add(name="series", datatype="FP32", shape=[1, 20, 1])
    request.raw_input_contents.append(bytes(80))
    return request


def _client(port: int, seconds: float, out: Any) -> None:
    import grpc
    import uvloop

    async def run() -> dict[str, float]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        request = _request()
        for _ in range(200):
            await stub.ModelInfer(request)
        times = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await stub.ModelInfer(request)
            times.append(time.perf_counter() - t0)
        done = 0
        end = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < end:
                await stub.ModelInfer(request)
                done += 1

        await asyncio.gather(*(worker() for _ in range(16)))
        await channel.close()
        return {"p50_ms": 1000 * statistics.median(times), "c1": len(times), "c16_rps": done / seconds}

    out.put(uvloop.run(run()))


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(kind: str, port: int, seconds: float) -> dict[str, float] | None:
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    server = ctx.Process(target=_serve, args=(kind, port, ready), daemon=True)
    server.start()
    if not ready.wait(20):
        server.kill()
        return None
    assert server.pid is not None
    before = _cpu_s(server.pid)
    client = ctx.Process(target=_client, args=(port, seconds, out))
    client.start()
    result: dict[str, float] = out.get(timeout=10 * seconds + 60)
    client.join()
    used = _cpu_s(server.pid) - before
    server.kill()
    server.join()
    total = result["c1"] + result["c16_rps"] * seconds + 200
    result["server_us_per_request"] = 1e6 * used / total
    return result


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--seconds", type=float, default=3.0, help="per phase (c=1, then c=16)")
    parser.add_argument("--rounds", type=int, default=2, help="the servers measured in turn this many times")
    args = parser.parse_args()
    kinds = ["grpc.aio", "grpc-sync"]
    try:
        import grpclib  # noqa: F401

        kinds.append("grpclib")
    except ImportError:
        print("grpclib not installed: skipped (pip install grpclib)")
    port = 18_500
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            port += 1
            result = measure(kind, port, args.seconds)
            if result is not None:
                rows[kind].append(result)
    print("| server | c=1 p50 (ms) | c=16 req/s | server CPU per request (µs) |")
    print("|---|---|---|---|")
    for kind, results in rows.items():
        p50 = " · ".join(f"{r['p50_ms']:.3f}" for r in results)
        rps = " · ".join(f"{r['c16_rps']:,.0f}" for r in results)
        cpu = " · ".join(f"{r['server_us_per_request']:.0f}" for r in results)
        print(f"| {kind} | {p50} | {rps} | {cpu} |")


if __name__ == "__main__":
    main()
