"""Server-level hardening without Triton (issue 15): log-flood protection, one line per record in text
logs, the connection cap's arithmetic, and one event loop for every server command."""

from __future__ import annotations

import asyncio
import io
import logging
import logging.config
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import pytest

from app.launcher import free_port
from app.observability.logging import RepeatFilter, TextFormatter, escape_control, log_config
from app.server import (
    SETTLE_S,
    GracefulServer,
    GuardedHttpToolsProtocol,
    connection_cap,
    event_loop_name,
    new_event_loop,
    run,
    server_config,
)
from app.settings import Settings
from tests.eventually import eventually


def _record(msg: str = "accept failed: %s", created: float = 1000.0, level: int = logging.ERROR,
            lineno: int = 10, **extra: object) -> logging.LogRecord:  # fmt: skip
    record = logging.makeLogRecord({
        "name": "asyncio", "levelno": level, "levelname": logging.getLevelName(level), "msg": msg,
        "args": ("EMFILE",), "pathname": "base_events.py", "lineno": lineno, **extra,
    })  # fmt: skip
    record.created = created
    return record


def test_a_repeated_error_is_logged_once_per_interval_with_a_count() -> None:
    flt = RepeatFilter(interval_s=10)
    passed = [flt.filter(_record(created=1000 + i * 0.0004)) for i in range(20_000)]
    assert passed.count(True) == 1  # 20,000 identical errors within 8 s -> one line
    later = _record(created=1011)
    assert flt.filter(later) and later.repeated == 19_999
    assert flt.filter(_record(lineno=11, created=1011.5))  # another place is not held back
    assert flt.filter(_record(msg="attempt 2: %s", created=1011.6))  # nor another text
    for when in ("1688.697328082", "1688.697345638"):  # the same event: addresses and timestamps aside
        held = flt.filter(_record(msg="Exception in callback <TimerHandle when=%s> at 0x7fbec2b4fc40",
                                  created=1012, args=(when,)))  # fmt: skip
    assert held is False
    assert all(flt.filter(_record(level=logging.INFO, created=1012)) for _ in range(100))  # access log
    assert all(RepeatFilter(interval_s=0).filter(_record()) for _ in range(3))  # 0 = off


def test_log_config_installs_the_filter_on_the_handler() -> None:
    config = log_config("INFO", "json", repeat_interval_s=60)
    config["handlers"]["default"]["stream"] = io.StringIO()
    logging.config.dictConfig(config)
    try:
        stream = logging.getLogger().handlers[0].stream  # type: ignore[attr-defined]
        for _ in range(500):
            logging.getLogger("uvicorn.error").error("Exceeded concurrency limit.")
        lines = stream.getvalue().splitlines()
    finally:
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    assert len(lines) == 1 and orjson.loads(lines[0])["msg"] == "Exceeded concurrency limit."


def test_text_logs_escape_cr_lf_from_client_values() -> None:
    forged = "/v1/models/x\r\n2026-01-01 00:00:00,000 INFO app.access: request status=200"
    record = logging.makeLogRecord({
        "name": "app.access", "levelno": logging.INFO, "levelname": "INFO", "msg": "request %s",
        "args": (forged,), "path": forged, "method": "GET\n",
    })  # fmt: skip
    line = TextFormatter().format(record)
    assert "\n" not in line and "\r" not in line
    assert "path=/v1/models/x\\r\\n2026-01-01" in line and "method=GET\\n" in line
    assert escape_control("a\tb\x1b[31m\x7f") == "a\tb\\x1b[31m\\x7f"


def test_connection_cap_leaves_room_for_other_descriptors() -> None:
    assert connection_cap(500) == 500
    assert connection_cap(0, fd_limit=20_000) == 18_000
    assert connection_cap(0, fd_limit=1024) == 768
    assert connection_cap(0, fd_limit=100) == 16


def test_server_config_carries_the_guards() -> None:
    settings = Settings(header_timeout_s=3, body_timeout_s=7, keepalive_timeout_s=2, max_connections=99)
    config = server_config("app.main:create_app", settings.server, factory=True)
    assert config.http is GuardedHttpToolsProtocol
    assert config.timeout_keep_alive == 2 and config.loop == event_loop_name()
    limits = config.tgw_limits  # type: ignore[attr-defined]
    assert (limits.header_timeout_s, limits.body_timeout_s, limits.max_connections) == (3, 7, 99)


def test_every_server_command_runs_on_the_same_loop() -> None:
    """`tgw up` (app.server.run) and `tgw serve` (uvicorn's loop option) both get uvloop when installed."""
    import uvloop

    async def loop_type() -> type:
        return type(asyncio.get_running_loop())

    assert event_loop_name() == "uvloop"
    assert run(loop_type()) is uvloop.Loop


_FLOOD_SERVER = r"""
import logging.config, resource, socket, subprocess, sys, threading, time
import uvicorn
from app.launcher import free_port
from app.observability.logging import log_config
from app.server import server_config
from app.settings import Settings

resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
logs = log_config("INFO", "json", float(sys.argv[1]))
logging.config.dictConfig(logs)

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})

port = free_port()
config = server_config(app, Settings(port=port, max_connections=1000).server, log_config=logs, lifespan="off",
                       loop="asyncio")
server = uvicorn.Server(config)
threading.Thread(target=server.run, daemon=True).start()
while not server.started:  # a script of its own: no test helpers here
    time.sleep(0.01)
client = "import resource, socket, time\n" \
    "resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n" \
    "socks = [socket.socket() for _ in range(300)]\n" \
    "[s.setblocking(False) or s.connect_ex(('127.0.0.1', %d)) for s in socks]\ntime.sleep(2)\n" % port
subprocess.run([sys.executable, "-c", client], timeout=30)
server.should_exit = True
time.sleep(0.5)
"""


def test_descriptor_exhaustion_does_not_flood_the_log() -> None:
    """The accept-error flood of issue 15, reproduced for real: stock asyncio, a descriptor limit of 64
    (the connection cap set above it on purpose) and 300 connections. Unfiltered it writes megabytes of
    identical errors in seconds; with the filter, a few lines."""
    import subprocess
    import sys

    def log_bytes(interval: str) -> tuple[int, str]:
        proc = subprocess.run([sys.executable, "-c", _FLOOD_SERVER, interval], capture_output=True, text=True,
                              timeout=60)  # fmt: skip
        return len(proc.stderr), proc.stderr

    unfiltered, text = log_bytes("0")
    assert "out of system resource" in text  # the scenario really exhausts descriptors
    filtered, text = log_bytes("10")
    print(f"\naccept-error flood: {unfiltered} bytes of log unfiltered, {filtered} with the filter")
    assert text.count("out of system resource") == 1
    assert filtered < 20_000 < unfiltered


# --- graceful shutdown: no request that reached the server is dropped ------------------------------------


def _request(path: str = "/x") -> bytes:
    return b"GET %s HTTP/1.1\r\nhost: t\r\n\r\n" % path.encode()


def _response(sock: socket.socket) -> bytes:
    """One whole response of the test app (body ``ok``), or what happened instead."""
    data = b""
    while not data.endswith(b"\r\n\r\nok"):
        try:
            chunk = sock.recv(4096)
        except OSError as exc:  # ECONNRESET: the request was dropped
            return repr(exc).encode()
        if not chunk:
            return data + b"EOF"
        data += chunk
    return data


def _status_line(sock: socket.socket) -> bytes:
    return _response(sock).split(b"\r\n", 1)[0]


@contextmanager
def _graceful_server(delay_s: float) -> Iterator[tuple[GracefulServer, asyncio.AbstractEventLoop, int]]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.05)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    port = free_port()
    config = server_config(app, Settings(port=port, host="127.0.0.1").server, lifespan="off", log_level="warning",
                           timeout_graceful_shutdown=10)  # fmt: skip
    server = GracefulServer(config, shutdown_delay_s=delay_s)
    loop = new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    eventually(lambda: server.started, 10, 0.01, "the server did not start")
    try:
        yield server, loop, port
    finally:
        thread.join(15)
        assert not thread.is_alive()
        loop.close()


def test_connections_queued_when_the_listener_closes_are_served_not_reset() -> None:
    """Closing a listening socket resets the connections the kernel completed but the loop had not
    accepted yet (the process was busy or not scheduled): clients that had sent their request got
    ECONNRESET. GracefulServer accepts the queue before closing; every one of them is answered."""
    with _graceful_server(delay_s=30) as (server, loop, port):
        stalled = threading.Event()

        def stall_then_exit() -> None:  # the loop is stuck; the exit comes due meanwhile
            stalled.set()
            time.sleep(0.6)  # a real wait: the stall itself
            server.should_exit = True

        loop.call_soon_threadsafe(stall_then_exit)
        assert stalled.wait(5)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]  # queued in the kernel
        for c in clients:
            c.sendall(_request())
        answers = [_status_line(c) for c in clients]
        for c in clients:
            c.close()
    assert answers == [b"HTTP/1.1 200 OK"] * 5


def test_shutdown_closes_idle_connections_and_lets_a_request_on_its_way_arrive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the listener closes, a kept-alive connection idle between requests is closed, while one that
    was accepted but whose request (or the rest of its head) has not arrived yet still gets its answer,
    with ``connection: close``; the server then exits."""
    monkeypatch.setattr("app.lifecycle.begin_drain_all", lambda: None)
    with _graceful_server(delay_s=0.2) as (server, loop, port):
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(_request())
        assert _status_line(idle) == b"HTTP/1.1 200 OK"
        fresh = socket.create_connection(("127.0.0.1", port))
        partial = socket.create_connection(("127.0.0.1", port))
        partial.sendall(b"GET /x HTTP/1.1\r\n")
        loop.call_soon_threadsafe(server.handle_exit, signal.SIGTERM, None)
        # a real wait: the listener closed, uvicorn's shutdown of connections ran (the requests below come
        # after it: nothing shows when it is over)
        time.sleep(0.2 + SETTLE_S + 0.5)
        assert idle.recv(10) == b""  # idle between requests: closed
        fresh.sendall(_request())
        partial.sendall(b"host: t\r\n\r\n")
        for sock in (fresh, partial):
            head = _response(sock).lower()
            assert head.startswith(b"http/1.1 200 ok") and b"connection: close" in head, head
            sock.close()
        idle.close()
