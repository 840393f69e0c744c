"""Slow webhook receivers cannot stall the others: 16 receivers that send their headers and then one
byte every 2 s, and a normal receiver on another host that is still delivered on schedule. Each slow
delivery is cut at TGW_WEBHOOK_TIMEOUT_S in total (not per byte), and at most TGW_WEBHOOK_MAX_PER_HOST
deliveries hold a slot for one receiver host."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port
from tests.gateway_server import running_gateway
from tests.integration.jobs_helpers import unique_row

pytestmark = pytest.mark.integration
JOBS = "/v1/models/identity_fp32/jobs"
TOTAL_S = 3.0


class DripReceiver:
    """Reads the request, answers ``200`` with a long Content-Length, then one byte every 2 s."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.port = port
        self.stop = threading.Event()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n")
            while not self.stop.is_set():
                conn.sendall(b".")
                self.stop.wait(2.0)

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


class NormalReceiver:
    def __init__(self, host: str, port: int) -> None:
        self.received: list[float] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append(time.monotonic())
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[tuple[list[DripReceiver], NormalReceiver]]:
    drips = [DripReceiver(free_port()) for _ in range(16)]
    normal = NormalReceiver("127.0.0.2", free_port())  # another host (all of 127/8 is loopback)
    try:
        yield drips, normal
    finally:
        for d in drips:
            d.close()
        normal.close()


def test_sixteen_drip_feeding_receivers_do_not_delay_another_webhook(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis, receivers: tuple[list[DripReceiver], NormalReceiver]
) -> None:
    drips, normal = receivers
    ports = [d.port for d in drips] + [normal.server.server_address[1]]
    with (
        running_gateway(
            triton_url=triton.grpc_url, triton_http_url=triton.http_url, redis_url=redis_server.url,
            worker_in_process=True, webhook_allow_private=True, webhook_allowed_ports=ports,
            webhook_timeout_s=TOTAL_S, webhook_concurrency=8, webhook_max_per_host=4, webhook_schedule_s="60",
        ) as url,
        httpx.Client(base_url=url, timeout=10) as c,
    ):  # fmt: skip
        slow = [
            c.post(
                JOBS,
                json={
                    "inputs": {"INPUT0": [unique_row()]},
                    "webhook": {"url": f"http://127.0.0.1:{d.port}/h"},
                },
            ).json()["id"]
            for d in drips
        ]
        deadline = time.monotonic() + 10
        while sum(d.connections for d in drips) < 4:  # the slow receivers hold their slots now
            assert time.monotonic() < deadline, "no slow delivery started"
            time.sleep(0.05)
        sent = time.monotonic()
        r = c.post(
            JOBS,
            json={
                "inputs": {"INPUT0": [unique_row()]},
                "webhook": {"url": f"http://127.0.0.2:{normal.server.server_address[1]}/h"},
            },
        )
        assert r.status_code == 202, r.text
        while not normal.received:
            assert time.monotonic() - sent < 10, "the normal webhook was not delivered"
            time.sleep(0.02)
        latency = normal.received[0] - sent
        # The slow ones: each attempt ends within the total bound, however slowly the bytes drip.
        deadline = time.monotonic() + 4 * TOTAL_S + 10
        while True:
            attempts = [a for i in slow for a in c.get(f"/v1/jobs/{i}").json()["webhook"]["attempts"]]
            if len(attempts) >= 8 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        most_at_once = max(d.connections for d in drips)
    print(
        f"drip test: normal webhook delivered {latency * 1000:.0f} ms after submit; slow attempts {len(attempts)}"
    )
    assert latency < 2.0, f"the normal webhook took {latency:.2f} s"
    assert len(attempts) >= 8
    assert all(a["duration_ms"] <= (TOTAL_S + 1.0) * 1000 for a in attempts), attempts
    assert most_at_once == 1  # each receiver was contacted once: nothing was retried early
