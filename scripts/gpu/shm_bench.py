"""Shared memory vs the socket for a large input (scripts/gpu/run.sh runs it; also runs on CPU).

Starts Triton with ``tests/models/image_fp32`` (FP32 ``[3, 224, 224]`` in, 602,112 bytes a row; 3 values
out) and times one Triton call per transport — the gateway's HTTP client, gRPC, and
``TGW_TRITON_SHM=system`` (``app.clients.triton_shm``) — for batches of 1 and 8 rows, one call at a time
(c=1) and 8 at once (c=8): calls/s and p50. Prints a markdown table.
"""

from __future__ import annotations

import asyncio
import statistics
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

    t0 = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(conc)))
    return len(lat) / (time.monotonic() - t0), 1000 * statistics.median(lat)


async def run(server: EmbeddedTriton, seconds: float) -> None:
    grpc = TritonGrpcClient(server.grpc_url)
    http = TritonHttpInfer(server.http_url)
    shm = SharedMemoryTransport(http, server.grpc_url, 64 * 1024, 8, 8 * 602112 + 4096)
    await shm.start()
    transports: dict[str, InferenceTransport] = {"HTTP (gateway client)": http, "gRPC": grpc,
                                                 "system shared memory": shm}  # fmt: skip
    print("| transport | rows | c | calls/s | p50 ms | MB/s in |")
    print("|---|---:|---:|---:|---:|---:|")
    try:
        for rows in (1, 8):
            image = np.random.default_rng(rows).normal(size=(rows, 3, 224, 224)).astype(np.float32)
            for conc in (1, 8):
                for name, t in transports.items():
                    await level(t, image, conc, 0.5)  # warm-up
                    rps, p50 = await level(t, image, conc, seconds)
                    print(
                        f"| {name} | {rows} | {conc} | {rps:,.0f} | {p50:.2f} "
                        f"| {rps * image.nbytes / 1e6:,.0f} |"
                    )
        print(f"shared-memory calls: {shm.calls}")
    finally:
        await shm.close()
        await http.close()
        await grpc.close()


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
