"""The HTTP inference client's connection handling, against a scripted local HTTP server (the real
Triton is in tests/integration/test_transport.py)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np
import orjson
import pytest

from app.clients.protocols import TritonCall
from app.clients.triton_http import TritonHttpInfer
from app.errors import ModelNotFound, UpstreamError, UpstreamRejected, UpstreamUnavailable
from tests.eventually import eventually_async


def _call(model: str, version: str, **kw: object) -> TritonCall:
    return TritonCall(model, version, {"A": X}, {"A": "FP32"}, deadline=time.monotonic() + 5, **kw)  # type: ignore[arg-type]


X = np.arange(4, dtype=np.float32).reshape(1, 4)


def _answer(arr: np.ndarray) -> bytes:
    head = orjson.dumps({"model_name": "m", "model_version": "3", "outputs": [
        {"name": "Y", "datatype": "FP32", "shape": list(arr.shape),
         "parameters": {"binary_data_size": arr.nbytes}}]})  # fmt: skip
    body = head + arr.tobytes()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nInference-Header-Content-Length: %d\r\n"
            b"Content-Length: %d\r\n\r\n" % (len(head), len(body))) + body  # fmt: skip


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(next(v for k, _, v in (ln.partition(b": ") for ln in head.split(b"\r\n"))
                      if k.lower() == b"content-length"))  # fmt: skip
    return head, await reader.readexactly(length)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _server(handler: Handler) -> tuple[asyncio.Server, str]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"127.0.0.1:{port}"


async def test_request_format_and_binary_answer() -> None:
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head, body = await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            seen.append((head, body))
            writer.write(_answer(X * 2))

    server, url = await _server(handler)
    client = TritonHttpInfer(url)
    for _ in range(3):
        result = await client.infer(_call("m/x", "3", parameters={"p": 1}, request_id="rid-7"))
        assert result.model_version == "3" and result.outputs["Y"].tolist() == (X * 2).tolist()
    await client.close()
    server.close()
    head, body = seen[0]
    assert head.startswith(b"POST /v2/models/m%2Fx/versions/3/infer HTTP/1.1\r\n")
    assert b"x-request-id: rid-7\r\n" in head
    n = int(head.split(b"Inference-Header-Content-Length: ")[1].split(b"\r\n")[0])
    header = orjson.loads(body[:n])
    assert header == {"inputs": [{"name": "A", "shape": [1, 4], "datatype": "FP32",
                                  "parameters": {"binary_data_size": 16}}],
                      "id": "rid-7", "parameters": {"p": 1, "binary_data_output": True}}  # fmt: skip
    assert body[n:] == X.tobytes()
    assert client._open == 1  # one keep-alive connection served all three


async def test_idle_connection_closed_by_the_server_is_replaced_without_an_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_answer(X))  # keep-alive by HTTP/1.1 rules, but the server closes anyway
        await writer.drain()
        writer.close()

    server, url = await _server(handler)
    client = TritonHttpInfer(url, retries=0)
    for _ in range(4):
        result = await client.infer(_call("m", ""))
        assert result.outputs["Y"].tolist() == X.tolist()
    await client.close()
    server.close()


async def test_connection_broken_mid_call_is_503_not_retried() -> None:
    calls = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal calls
        await _read_request(reader)
        calls += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    server, url = await _server(handler)
    client = TritonHttpInfer(url, retries=2)
    with pytest.raises(UpstreamUnavailable):
        await client.infer(_call("m", ""))
    assert calls == 1  # it may have reached Triton: not sent again
    server.close()


async def test_error_answers_map_like_grpc() -> None:
    answers = {b"/v2/models/gone/infer": (404, "unknown model"), b"/v2/models/bad/infer": (400, "bad shape"),
               b"/v2/models/boom/infer": (500, "model crashed")}  # fmt: skip

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head, _ = await _read_request(reader)
            except asyncio.IncompleteReadError:
                return
            status, message = answers[head.split(b" ")[1]]
            body = orjson.dumps({"error": message})
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))

    server, url = await _server(handler)
    client = TritonHttpInfer(url)
    with pytest.raises(ModelNotFound, match="unknown model"):
        await client.infer(_call("gone", ""))
    with pytest.raises(UpstreamRejected, match="bad shape"):  # the client's error: 400, not retried
        await client.infer(_call("bad", ""))
    with pytest.raises(UpstreamError, match="model crashed"):
        await client.infer(_call("boom", ""))
    await client.close()
    server.close()


async def test_pool_is_bounded_and_waiters_are_served() -> None:
    open_now = peak = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_now, peak
        open_now += 1
        peak = max(peak, open_now)
        try:
            while True:
                try:
                    await _read_request(reader)
                except asyncio.IncompleteReadError:
                    return
                await asyncio.sleep(0.01)
                writer.write(_answer(X))
        finally:
            open_now -= 1

    server, url = await _server(handler)
    client = TritonHttpInfer(url, max_connections=3)
    results = await asyncio.gather(*(
        client.infer(_call("m", "")) for _ in range(20)
    ))  # fmt: skip
    assert len(results) == 20 and peak <= 3
    await client.close()
    server.close()


async def test_a_waiter_cancelled_by_its_deadline_does_not_leak_the_connection_it_was_handed() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    server, url = await _server(handler)
    client = TritonHttpInfer(url, max_connections=1)
    conn = await client._acquire()
    waiting = asyncio.create_task(client._acquire())
    await asyncio.sleep(0)  # the pool is full: it waits
    client._release(conn)  # handed to the waiter ...
    waiting.cancel()  # ... which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert client._idle == [conn] and client._open == 1  # back in the pool, not lost
    await client.close()
    server.close()


async def test_ipv6_literal_url() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await _read_request(reader)
        seen.append(head)
        writer.write(_answer(X))
        await writer.drain()

    try:
        server = await asyncio.start_server(handler, "::1", 0)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = server.sockets[0].getsockname()[1]
    client = TritonHttpInfer(f"http://[::1]:{port}")
    result = await client.infer(_call("m", ""))
    np.testing.assert_array_equal(result.outputs["Y"], X)
    assert f"Host: [::1]:{port}\r\n".encode() in seen[0] and client.url == f"http://[::1]:{port}"
    await client.close()
    server.close()


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


async def test_https(self_signed: tuple[Path, Path]) -> None:
    cert, key = self_signed
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_answer(X * 3))
        await writer.drain()

    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    client = TritonHttpInfer(f"https://localhost:{port}", ssl_context=ssl.create_default_context(cafile=cert))
    result = await client.infer(_call("m", ""))
    np.testing.assert_array_equal(result.outputs["Y"], X * 3)
    await client.close()
    untrusted = TritonHttpInfer(f"https://localhost:{port}", retries=0)  # system CAs: the cert is refused
    with pytest.raises(UpstreamUnavailable):
        await untrusted.infer(_call("m", ""))
    await untrusted.close()
    server.close()


async def test_answer_over_the_size_cap_is_refused() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _read_request(reader)
        writer.write(_answer(np.zeros((1, 4096), np.float32)))
        await writer.drain()

    server, url = await _server(handler)
    client = TritonHttpInfer(url, max_response_bytes=1024)
    with pytest.raises(UpstreamError, match="exceeds 1024 bytes"):
        await client.infer(_call("m", ""))
    await client.close()
    server.close()


async def test_close_ends_calls_in_flight() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers

    server, url = await _server(handler)
    client = TritonHttpInfer(url)
    call = asyncio.create_task(client.infer(_call("m", "")))
    await eventually_async(lambda: len(client._busy) == 1, 10, 0.005)  # the call is on its connection
    t0 = time.monotonic()
    await client.close()
    with pytest.raises(UpstreamUnavailable):
        await call
    assert time.monotonic() - t0 < 1.0
    server.close()
