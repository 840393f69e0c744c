"""Run by test_keepalive.py in a child process (gRPC core logs a received GOAWAY on stderr): hold one
gRPC channel to Triton idle, then busy with calls that keep the stream open without data, with either the
gateway's keepalive options or an aggressive set (the gateway's old ones, scaled), then exit.

    python -m tests.integration.keepalive_client HOST:PORT gateway|aggressive IDLE_S BUSY_S PING_S
"""

from __future__ import annotations

import asyncio
import sys
import time

import numpy as np
import tritonclient.grpc.aio as grpcclient

from app.clients.triton import channel_args


async def main(url: str, mode: str, idle_s: float, busy_s: float, ping_s: float) -> None:
    if mode == "gateway":
        args = channel_args(keepalive_s=ping_s, keepalive_timeout_s=5.0)
    else:  # what the gateway used to send: pings while idle, no cap on pings without data
        args = [*channel_args(keepalive_s=ping_s, keepalive_timeout_s=5.0, without_calls=True)]
        args = [(k, 0 if k == "grpc.http2.max_pings_without_data" else v) for k, v in args]
    client = grpcclient.InferenceServerClient(url, channel_args=args)
    assert await client.is_server_live()
    await asyncio.sleep(idle_s)  # idle: connected, no call in flight
    end = time.monotonic() + busy_s
    calls = 0
    while time.monotonic() < end:  # busy: a call in flight all the time, the stream silent for 1.5 s
        delay = grpcclient.InferInput("DELAY_S", [1, 1], "FP32")
        delay.set_data_from_numpy(np.array([[1.5 + calls / 1e6]], dtype=np.float32))
        await client.infer("sleep_fp32", [delay], client_timeout=10)
        calls += 1
    assert await client.is_server_live()
    await client.close()
    sys.stdout.write(f"calls={calls}\n")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], *(float(a) for a in sys.argv[3:6])))
