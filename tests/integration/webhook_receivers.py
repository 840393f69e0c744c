"""Webhook receivers on loopback for the delivery tests (tests/integration/test_webhook_fairness.py,
test_jobs_webhook_slow.py): slow ones that hold a delivery as long as the gateway lets them, and fast ones.
All of 127/8 is loopback, so each 127.0.0.x is another receiver host for the per-host cap."""

from __future__ import annotations

import contextlib
import email.utils
import select
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class SlowReceiver:
    """``silent``: reads the request and never answers; ``drip``: answers 200 with a long Content-Length,
    then one byte every 2 s. Either holds a delivery as long as the gateway lets it. ``connections``: how
    many it accepted; ``open``: how many it holds now."""

    def __init__(self, host: str, mode: str) -> None:
        self.sock = socket.create_server((host, 0))
        self.host, self.port, self.mode = host, self.sock.getsockname()[1], mode
        self.url = f"http://{host}:{self.port}/h"
        self.stop = threading.Event()
        self.connections = 0
        self.open = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._hold, args=(conn,), daemon=True).start()

    def _hold(self, conn: socket.socket) -> None:
        with self.lock:
            self.connections += 1
            self.open += 1
        with conn, contextlib.suppress(OSError):
            conn.settimeout(30)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
            if self.mode == "drip":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n\r\n")
            while not self.stop.is_set():  # until the gateway gives up and closes
                if self.mode == "drip":
                    conn.sendall(b".")
                readable, _, _ = select.select([conn], [], [], 2.0)
                if readable and conn.recv(65536) == b"":
                    break
        with self.lock:
            self.open -= 1

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


class FastReceiver:
    """Answers at once (HTTP/1.1 keep-alive): 204, or while ``busy`` 503 with a Retry-After an hour away.
    ``received``: when each delivery arrived (``time.monotonic()``)."""

    def __init__(self, host: str) -> None:
        self.received: list[float] = []
        self.busy = False
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["content-length"]))
                if receiver.busy:
                    self.send_response(503)
                    self.send_header("Retry-After", email.utils.formatdate(time.time() + 3600, usegmt=True))
                else:
                    with receiver.lock:
                        receiver.received.append(time.monotonic())
                    self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/h"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def receivers(*made: SlowReceiver | FastReceiver) -> Iterator[None]:
    """Closes every receiver when the block ends."""
    try:
        yield
    finally:
        for r in made:
            r.close()
