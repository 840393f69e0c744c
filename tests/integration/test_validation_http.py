"""Every bad input gets its status and a JSON error naming the field; nothing reaches Triton."""

from __future__ import annotations

import socket
from urllib.parse import urlparse

import httpx
import pytest

pytestmark = pytest.mark.integration

IDENT = "/v1/models/identity_fp32/infer"
TYPED = "/v1/models/typed/infer"
GOOD_TYPED = {"I8": [1, 2], "FLAG": [True], "TEXT": ["a"], "F16": [1.0, 2.0]}


@pytest.mark.parametrize(
    ("url", "inputs", "field", "fragment"),
    [
        (IDENT, {"INPUT0": [[1, 2], [3]]}, "inputs.INPUT0", "ragged"),
        (IDENT, {"INPUT0": [1, 2]}, "inputs.INPUT0", "expected shape [-1, -1], got [2]"),
        (IDENT, {"INPUT0": [[[1]]]}, "inputs.INPUT0", "expected shape"),
        (IDENT, {"INPUT0": [[1.0]] * 65}, "inputs.INPUT0", "batch size 65 is outside 1..64"),
        (IDENT, {"INPUT0": [["a"]]}, "inputs.INPUT0", "expected numbers for FP32"),
        (IDENT, {"INPUT0": [[None]]}, "inputs.INPUT0", "expected numbers"),
        (IDENT, {"INPUT0": [[1e39]]}, "inputs.INPUT0", "out of FP32 range"),
        (IDENT, {"INPUT0": "x"}, "inputs.INPUT0", "expected a nested list"),
        (IDENT, {"NOPE": [[1.0]]}, "inputs.NOPE", "has no input 'NOPE'"),
        (IDENT, {}, "inputs", "expected an object"),
        (
            "/v1/models/sleep_fp32/infer",
            {"DELAY_S": [[0.1, 0.2]]},
            "inputs.DELAY_S",
            "expected shape [-1, 1]",
        ),
        (TYPED, {**GOOD_TYPED, "I8": [1, 300]}, "inputs.I8", "out of range for INT8"),
        (TYPED, {**GOOD_TYPED, "I8": [1.5, 2]}, "inputs.I8", "expected integers"),
        (TYPED, {**GOOD_TYPED, "FLAG": [1]}, "inputs.FLAG", "true/false"),
        (TYPED, {**GOOD_TYPED, "F16": [1.0, 70000.0]}, "inputs.F16", "FP16"),
        (TYPED, {**GOOD_TYPED, "TEXT": [1]}, "inputs.TEXT", "strings"),
        (
            TYPED,
            {k: v for k, v in GOOD_TYPED.items() if k != "F16"},
            "inputs.F16",
            "required input is missing",
        ),
        (TYPED, {**GOOD_TYPED, "I8": [1, 2, 3]}, "inputs.I8", "expected shape [2], got [3]"),
    ],
)
def test_invalid_inputs_are_422(
    client: httpx.Client, url: str, inputs: object, field: str, fragment: str
) -> None:
    r = client.post(url, json={"inputs": inputs})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_input"
    assert err["details"]["field"] == field
    assert fragment in err["message"]


def test_nan_literal_is_422_not_400(client: httpx.Client) -> None:
    r = client.post(IDENT, content=b'{"inputs": {"INPUT0": [[NaN, 1.0]]}}')
    assert r.status_code == 422
    assert "NaN" in r.json()["error"]["message"]


def test_unknown_output_and_bad_parameters(client: httpx.Client) -> None:
    r = client.post(IDENT, json={"inputs": {"INPUT0": [[1.0]]}, "outputs": ["NOPE"]})
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "outputs"
    r = client.post(IDENT, json={"inputs": {"INPUT0": [[1.0]]}, "parameters": {"priority": 1}})
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "parameters.priority"
    r = client.post(IDENT, json={"inputs": {"INPUT0": [[1.0]]}, "extra": 1})
    assert r.status_code == 422 and r.json()["error"]["details"]["field"] == "extra"


def test_not_json_is_400(client: httpx.Client) -> None:
    for raw in (b"not json", b"", b'{"inputs": '):
        r = client.post(IDENT, content=raw)
        assert r.status_code == 400, raw
        assert r.json()["error"]["code"] == "bad_request"


def test_unknown_model_is_404(client: httpx.Client) -> None:
    r = client.post("/v1/models/ghost/infer", json={"inputs": {"INPUT0": [[1.0]]}})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_body_over_limit_is_413_declared(start_gateway) -> None:  # type: ignore[no-untyped-def]
    with start_gateway(max_body_bytes=4096) as url:
        r = httpx.post(f"{url}{IDENT}", content=b"x" * 10_000)
        assert r.status_code == 413
        assert r.json()["error"]["code"] == "payload_too_large"


def test_body_over_limit_is_413_streamed_without_reading_it_all(start_gateway) -> None:  # type: ignore[no-untyped-def]
    """A chunked upload with no Content-Length is cut off at the limit, before the client has sent it all."""
    with start_gateway(max_body_bytes=4096) as url:
        parsed = urlparse(url)
        with socket.create_connection((parsed.hostname, parsed.port), timeout=10) as sock:
            sock.sendall(
                f"POST {IDENT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                "Transfer-Encoding: chunked\r\n\r\n".encode()
            )
            chunk = b"a" * 8192
            sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            # never send the terminating chunk: the gateway must answer anyway
            data = b""
            while b"\r\n\r\n" not in data or b"}}" not in data:
                part = sock.recv(4096)
                if not part:
                    break
                data += part
        assert data.startswith(b"HTTP/1.1 413"), data[:200]
        assert b"payload_too_large" in data
