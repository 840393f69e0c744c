"""Issue 19 items 6 and 17 against the real Triton and Redis, over real sockets:

- 17: an upload over ``TGW_MAX_BODY_BYTES`` sent through ``tritonclient.http`` gets a readable 413 (the
  gateway reads and discards the rest of the body before closing) instead of a connection reset; any
  method but POST on an infer route is 405 with ``Allow: POST`` (as Triton answers), not 404.
- 6: clients that upload a small gzip body expanding to megabytes and never read the answer: the answers
  held for them stay within ``TGW_SEND_BUFFER_TOTAL_BYTES`` (gateway RSS bounded), a connection whose
  answer is not drained within ``TGW_SEND_TIMEOUT_S`` is dropped, a held answer keeps its key's in-flight
  slot until then, and the gateway keeps serving.
"""

from __future__ import annotations

import ctypes
import gzip
import json
import os
import socket
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonhttp
from tritonclient.utils import InferenceServerException

from app.launcher import EmbeddedRedis, EmbeddedTriton
from tests.eventually import eventually
from tests.gateway_server import running_gateway
from tests.integration.conftest import GatewayFactory
from tests.integration.test_auth import auth_settings, make_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

MB = 1024 * 1024


# --- item 17 -----------------------------------------------------------------------------------------
def test_over_limit_upload_through_tritonclient_is_a_readable_413(start_gateway: GatewayFactory) -> None:
    with start_gateway(max_body_bytes=256 * 1024) as url:
        client = tritonhttp.InferenceServerClient(url.removeprefix("http://"), network_timeout=30)
        try:
            data = np.zeros((1, 8 * 1024 * 1024), dtype=np.float32)  # 32 MiB: more than socket buffers take
            inp = tritonhttp.InferInput("INPUT0", list(data.shape), "FP32")
            inp.set_data_from_numpy(data, binary_data=True)
            for _ in range(3):  # every time, not by luck of timing
                with pytest.raises(InferenceServerException) as caught:
                    client.infer("identity_fp32", [inp])
                assert caught.value.status() == "413", caught.value
                assert "TGW_MAX_BODY_BYTES" in str(caught.value) or "too large" in str(caught.value).lower()
            # the same client goes on working (a fresh connection after the 413's close)
            small = tritonhttp.InferInput("INPUT0", [1, 4], "FP32")
            small.set_data_from_numpy(np.ones((1, 4), dtype=np.float32), binary_data=True)
            out = client.infer("identity_fp32", [small]).as_numpy("OUTPUT0")
            assert out is not None and out.tolist() == [[1.0, 1.0, 1.0, 1.0]]
        finally:
            client.close()


def _post_then_read(port: int, size: int) -> bytes:
    """A client that sends its whole request before reading (as ``http.client``/``requests`` do): with
    the rest of the body unread when the gateway closed, its send failed with a reset."""
    head = (f"POST /v2/models/identity_fp32/infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
            f"application/octet-stream\r\nInference-Header-Content-Length: 2\r\nContent-Length: {size}\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode())
        chunk = b"\0" * (256 * 1024)
        for _ in range(size // len(chunk)):
            sock.sendall(chunk)
        answer = b""
        while data := sock.recv(65536):
            answer += data
    return answer


def test_over_limit_body_is_read_and_discarded_before_the_413(start_gateway: GatewayFactory) -> None:
    with start_gateway(max_body_bytes=256 * 1024, body_discard_bytes=16 * MB) as url:
        port = int(url.rsplit(":", 1)[1])
        for _ in range(3):
            answer = _post_then_read(port, 12 * MB)  # 48 x the limit, within the discard bound
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 413"), answer[:200]
            assert b"connection: close" in head.lower()
            assert b"TGW_MAX_BODY_BYTES" in body
        with pytest.raises((ConnectionResetError, BrokenPipeError)):  # past the discard bound: cut off
            _post_then_read(port, 64 * MB)
        assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200


def test_other_methods_on_infer_routes_are_405(gateway_url: str) -> None:
    with httpx.Client(base_url=gateway_url, timeout=10) as c:
        for path in ("/v2/models/identity_fp32/infer", "/v2/models/identity_fp32/versions/1/infer",
                     "/v1/models/identity_fp32/infer", "/v1/models/identity_fp32/versions/1/infer"):  # fmt: skip
            for method in ("GET", "PUT", "DELETE"):
                r = c.request(method, path)
                assert r.status_code == 405, (method, path, r.status_code, r.text)
                assert r.headers["allow"] == "POST"
                assert "error" in r.json()
        r = c.post("/v2/models/identity_fp32/infer", json={"inputs": [
            {"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]})  # fmt: skip
        assert r.status_code == 200, r.text


# --- item 6 ------------------------------------------------------------------------------------------
FLOATS = 7 * MB // 4  # 7 MiB of zeros: ~7 KB gzip


def _bomb_request(port: int, headers: dict[str, str] | None = None, tag: int = 0) -> bytes:
    """A ~7 KB gzip body that inflates to 7 MiB of FP32 (raw binary) for identity_fp32, whose answer is
    as large; ``tag`` makes it unique (identical requests in flight would share one Triton call)."""
    head = json.dumps({
        "inputs": [{"name": "INPUT0", "shape": [1, FLOATS], "datatype": "FP32",
                    "parameters": {"binary_data_size": FLOATS * 4}}],
        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
    }).encode()  # fmt: skip
    data = bytearray(FLOATS * 4)
    data[:4] = np.float32(tag).tobytes()
    body = gzip.compress(head + bytes(data), 9)
    assert len(body) < 16 * 1024
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    return (
        f"POST /v2/models/identity_fp32/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Encoding: gzip\r\nCache-Control: no-store\r\n"
        f"Inference-Header-Content-Length: {len(head)}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def _non_reader(port: int, request: bytes) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # the kernel takes little of the answer
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    return sock


def _rss() -> int:
    """This process's resident memory, after glibc returns freed heap pages (what is left is live: the
    transient buffers of answers already sent would otherwise blur the count)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open(f"/proc/{os.getpid()}/status") as f:  # the gateway runs in this process (a thread)
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _dropped(sock: socket.socket, timeout: float) -> bool:
    """Read the whole answer: True when the connection ended before all of it arrived. Only called once
    the gateway has had its chance to drop the connection (reading earlier would drain the answer)."""
    sock.settimeout(timeout)
    got = 0
    try:
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += len(chunk)
            if got > FLOATS * 4:  # the whole answer (head and body) came
                return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    return got < FLOATS * 4


def _serving(url: str) -> bool:
    return httpx.get(f"{url}/healthz", timeout=10).status_code == 200


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def _executed(triton: EmbeddedTriton) -> int:
    """Requests identity_fp32 has executed in Triton (its own statistics)."""
    stats = httpx.get(f"{triton.http_url}/v2/models/identity_fp32/stats", timeout=10).json()
    return sum(int(m["inference_stats"]["success"]["count"]) for m in stats["model_stats"])


def test_answers_held_for_non_readers_stay_bounded(
    start_gateway: GatewayFactory, triton: EmbeddedTriton, sockets: list[socket.socket]
) -> None:
    bound = 16 * MB
    with start_gateway(send_buffer_total_bytes=bound, send_timeout_s=60) as url:
        port = int(url.rsplit(":", 1)[1])
        executed = _executed(triton)
        warm = _non_reader(port, _bomb_request(port, tag=time.time_ns() % 1000))
        assert not _dropped(warm, 20.0)  # one answer read in full: the allocator's working set is warm
        warm.close()
        base = _rss()
        first = 1000 + time.time_ns() % 1000 * 100
        tags = range(first, first + 30)
        for tag in tags:  # 30 x 7 MiB answers, nothing read: what the kernel does not take stays in memory
            sockets.append(_non_reader(port, _bomb_request(port, tag=tag)))
            time.sleep(0.15)  # pacing: the requests arrive one after another, oldest stalled longest
        eventually(lambda: _executed(triton) >= executed + 31, 90, 0.2, "every answer computed")
        time.sleep(1.0)  # a real wait: ... and written (or its connection dropped), which nothing shows
        growth = _rss() - base
        assert growth < bound + 40 * MB, growth / MB
        dropped = sum(_dropped(s, 20.0) for s in sockets)  # now read: which ones got their whole answer?
        assert dropped >= 30 - bound // (7 * MB) - 1, dropped  # the connections stalled longest went
        assert _serving(url)  # still serving
        r = httpx.post(f"{url}/v2/models/identity_fp32/infer", timeout=10, json={"inputs": [
            {"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]})  # fmt: skip
        assert r.status_code == 200, r.text


def test_an_answer_not_read_in_time_is_dropped_and_holds_its_slot_until_then(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis, sockets: list[socket.socket]
) -> None:
    settings = auth_settings(triton, redis_server.url, send_timeout_s=3.0)
    with running_gateway(**settings) as url:
        key = make_key(url, concurrency=2)
        port = int(url.rsplit(":", 1)[1])
        request = _bomb_request(port, {"Authorization": f"Bearer {key['key']}"})
        small = {"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
        auth = {"Authorization": f"Bearer {key['key']}"}
        executed = _executed(triton)
        sockets += [_non_reader(port, request) for _ in range(2)]
        eventually(lambda: _executed(triton) > executed, 60, 0.1, "the answer computed")
        # a real wait: both answers written (one Triton call serves both identical requests), which nothing
        # shows; none read
        time.sleep(0.5)
        written = time.monotonic()
        # each request lasts until its answer has drained: the key's two in-flight slots are still taken
        busy = httpx.post(f"{url}/v2/models/identity_fp32/infer", json=small, headers=auth, timeout=10)
        assert busy.status_code == 429 and "concurrency" in busy.text, busy.text
        assert _serving(url)
        # past TGW_SEND_TIMEOUT_S (3 s) both connections are dropped with what they buffered
        time.sleep(max(0.0, written + 3.0 + 2.0 - time.monotonic()))  # a real wait: past the send timeout
        assert all(_dropped(s, 10.0) for s in sockets)

        def admitted() -> bool:  # the slots are given back (released without waiting for Redis)
            ok = httpx.post(f"{url}/v2/models/identity_fp32/infer", json=small, headers=auth, timeout=10)
            assert ok.status_code == 200, ok.text
            return True

        eventually(admitted, 10, 0.1)
