"""Shared memory vs the socket, large input and output (scripts/gpu/run.sh runs it; also runs on CPU).

Starts Triton with ``tests/models/image_fp32`` (FP32 ``[3, 224, 224]`` in, 602,112 bytes a row; out its
3-value mean and its negation, 602,112 bytes a row) and times one Triton call per transport — the
gateway's HTTP client, gRPC, ``TGW_TRITON_SHM=system`` and, where cuda-bindings and a GPU are there,
``TGW_TRITON_SHM=cuda`` (``app.clients.triton_shm``) — for batches of 1 and 8 rows, one call at a time
(c=1) and 8 at once (c=8): calls/s and p50. Every transport's answer is checked first; the shared-memory
pools are checked registered with Triton while they run and gone from it after. Prints a markdown table.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.clients.protocols import InferenceTransport, TritonCall  # noqa: E402
from app.clients.triton import TritonGrpcClient  # noqa: E402
from app.clients.triton_http import TritonHttpInfer  # noqa: E402
from app.clients.triton_shm import SharedMemoryTransport  # noqa: E402
from app.launcher import EmbeddedTriton, free_port  # noqa: E402

MODEL = "image_fp32"


async def level(t: InferenceTransport, image: np.ndarray, conc: int, seconds: float) -> tuple[float, float]:
    lat: list[float] = []
    stop = time.monotonic() + seconds

    async def loop() -> None:
        while time.monotonic() < stop:
            call = TritonCall(MODEL, "", {"IMAGE": image}, {"IMAGE": "FP32"}, deadline=time.monotonic() + 30)
            t0 = time.perf_counter()
            result = await t.infer(call)
            lat.append(time.perf_counter() - t0)
            assert result.outputs["MEAN"].shape == (len(image), 3)
            assert result.outputs["NEG"].shape == image.shape

    t0 = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(conc)))
    return len(lat) / (time.monotonic() - t0), 1000 * statistics.median(lat)


CRASH = """
import asyncio, os, sys
from app.clients.triton_shm import SharedMemoryTransport
async def main():
    t = SharedMemoryTransport(None, sys.argv[1], 1024, 2, 1 << 20, kind=sys.argv[2])
    await t.start()
    print(t.kind, *t.names, flush=True)
    os._exit(0)  # as a crash: no close
asyncio.run(main())
"""


async def crash_check(server: EmbeddedTriton, kind: str) -> None:
    """A gateway killed without closing leaves registered regions; the next one to start removes them."""
    argv = [sys.executable, "-c", CRASH, server.grpc_url, kind]
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=99, cwd=ROOT)
    out = done.stdout.split()
    if done.returncode or not out:
        print(f"crash check {kind}: the child failed: {done.stderr[-2000:]}")
        return
    got, dead = out[0], set(out[1:])
    t = SharedMemoryTransport(None, server.grpc_url, 1024, 1, 1 << 20, kind=kind)  # type: ignore[arg-type]
    before = await t.regions.status(t._client) & dead
    await t.start()
    after = await t.regions.status(t._client) & dead
    files = [n for n in dead if (Path("/dev/shm") / n).exists()]
    print(f"crash check {kind} -> {got}: dead gateway's regions registered before the next start: "
          f"{len(before)}, after: {len(after)}; files left in /dev/shm: {len(files)}")  # fmt: skip
    await t.close()


async def run(server: EmbeddedTriton, seconds: float) -> None:
    grpc = TritonGrpcClient(server.grpc_url)
    http = TritonHttpInfer(server.http_url)
    region = 2 * 8 * 602112 + 4096  # 8 rows in and out
    shms = {kind: SharedMemoryTransport(http, server.grpc_url, 64 * 1024, 8, region, kind=kind)
            for kind in ("system", "cuda")}  # fmt: skip
    transports: dict[str, InferenceTransport] = {"HTTP (gateway client)": http, "gRPC": grpc}
    for kind, t in shms.items():
        await t.start()
        if t.kind == kind:  # cuda falls back to system where it cannot work: not measured twice
            transports[f"{kind} shared memory"] = t
            print(f"{kind}: registered with Triton: {sorted(await t.regions.status(t._client))}")
        else:
            print(f"{kind}: not available here (see the warning above)")
    print("| transport | rows | c | calls/s | p50 ms | MB/s in+out |")
    print("|---|---:|---:|---:|---:|---:|")
    try:
        for rows in (1, 8):
            image = np.random.default_rng(rows).normal(size=(rows, 3, 224, 224)).astype(np.float32)
            for name, t in transports.items():  # right answers first
                call = TritonCall(
                    MODEL, "", {"IMAGE": image}, {"IMAGE": "FP32"}, deadline=time.monotonic() + 30
                )
                got = (await t.infer(call)).outputs
                np.testing.assert_array_equal(got["NEG"], -image, err_msg=name)
                mean = image.reshape(rows, 3, -1).mean(axis=2)
                np.testing.assert_allclose(got["MEAN"], mean, rtol=1e-4, atol=1e-5, err_msg=name)
            for conc in (1, 8):
                for name, t in transports.items():
                    await level(t, image, conc, 0.5)  # warm-up
                    rps, p50 = await level(t, image, conc, seconds)
                    print(
                        f"| {name} | {rows} | {conc} | {rps:,.0f} | {p50:.2f} "
                        f"| {rps * 2 * image.nbytes / 1e6:,.0f} |"
                    )
        for kind, t in shms.items():
            print(f"{kind} -> {t.kind}: {t.calls} calls through shared memory, {t.output_calls} with outputs")
    finally:
        for t in shms.values():
            client = t._client
            await t.close()
            t._client = type(client)(server.grpc_url)
            left = await t.regions.status(t._client) & set(t.names)
            print(f"{t.kind}: regions still registered after close: {sorted(left) or 'none'}")
            await t._client.close()
        await http.close()
        await grpc.close()
    for kind in ("system", "cuda"):
        await crash_check(server, kind)


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    state = Path(tempfile.mkdtemp(prefix="tgw-shm-bench-"))
    load = ["--model-control-mode=explicit", f"--load-model={MODEL}"]
    server = EmbeddedTriton([ROOT / "tests" / "models"], free_port(), free_port(), free_port(), state,
                            extra_args=load)  # fmt: skip
    server.start(timeout=120)
    try:
        asyncio.run(run(server, seconds))
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
