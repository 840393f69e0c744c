"""Property-based tests (hypothesis) of the twin codecs (app/codecs): any bytes sent to /v1 or /v2
decode to a validated request or a 4xx ``GatewayError`` naming the problem, never another exception;
v2 JSON and binary requests of the same tensor decode to the same arrays; answers encode back to what
was computed (JSON and binary), with the request id echoed."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.clients.protocols import TritonResult
from app.errors import GatewayError
from app.frontends.kserve_http import binary
from app.frontends.kserve_http import codec as v2
from app.frontends.rest import codec as v1
from app.services.inference import InferResponse
from app.services.registry import ModelInfo, TensorSpec
from app.services.validation import NUMPY_DTYPES

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
INFO = ModelInfo(
    name="m", version="1", versions=("1",), platform="python", max_batch_size=4,
    inputs={"X": TensorSpec("X", "FP32", (-1, 3))}, outputs={"Y": TensorSpec("Y", "FP32", (-1, 3))},
)  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=25,
)
ARRAYS = hnp.arrays(np.float32, st.tuples(st.integers(1, 4), st.just(3)),
                    elements=st.floats(-1e6, 1e6, width=32))  # fmt: skip


def _client_error(exc: GatewayError) -> None:
    assert 400 <= exc.status_code < 500 and exc.message


@SETTINGS
@given(raw=st.binary(max_size=200) | JSON.map(lambda b: json.dumps(b).encode()))
def test_v1_any_bytes(raw: bytes) -> None:
    try:
        req = v1.decode(INFO, raw)
    except GatewayError as exc:
        _client_error(exc)
    else:
        assert req.inputs["X"].dtype == np.float32


@SETTINGS
@given(
    body=JSON,
    tail=st.binary(max_size=48),
    header_length=st.none() | st.integers(-5, 300).map(str) | st.text(max_size=4),
)
def test_v2_any_message(body: Any, tail: bytes, header_length: str | None) -> None:
    head = json.dumps(body).encode()
    try:
        got = v2.decode(INFO, head + tail, header_length)
    except GatewayError as exc:
        _client_error(exc)
    else:
        assert set(got.request.inputs) == {"X"}


@SETTINGS
@given(arr=ARRAYS, rid=st.none() | st.text(max_size=10))
def test_v2_json_and_binary_requests_agree(arr: np.ndarray, rid: str | None) -> None:
    plain = {
        "inputs": [
            {"name": "X", "shape": list(arr.shape), "datatype": "FP32", "data": arr.reshape(-1).tolist()}
        ]
    }
    if rid is not None:
        plain["id"] = rid
    from_json = v2.decode(INFO, orjson.dumps(plain), None)
    blobs: list[bytes] = []
    header: dict[str, Any] = {"inputs": [binary.binary_item("X", "FP32", arr, blobs)]}
    if rid is not None:
        header["id"] = rid
    message, length = binary.pack(header, blobs)
    from_binary = v2.decode(INFO, message, str(length))
    np.testing.assert_array_equal(from_json.request.inputs["X"], arr)
    np.testing.assert_array_equal(from_binary.request.inputs["X"], arr)
    assert from_json.id == from_binary.id == rid


@SETTINGS
@given(arr=ARRAYS, binary_out=st.booleans(), rid=st.none() | st.text(max_size=10))
def test_answers_encode_back(arr: np.ndarray, binary_out: bool, rid: str | None) -> None:
    response = InferResponse("m", TritonResult("1", {"Y": arr}, {"Y": "FP32"}), "MISS")
    v1_reply = v1.encode(response)
    assert v1_reply.status == 200
    np.testing.assert_array_equal(np.asarray(orjson.loads(v1_reply.body)["outputs"]["Y"], np.float32), arr)
    req = v2.V2Request(v2.decode(INFO, orjson.dumps({"inputs": [{"name": "X", "shape": [1, 3], "datatype": "FP32",
                                                                  "data": [1, 2, 3]}]}), None).request,
                       rid, {"Y"} if binary_out else set())  # fmt: skip
    reply = v2.encode(response, req)
    headers = dict(reply.headers)
    if binary_out:
        length = int(headers[binary.HEADER_LENGTH_BYTES])
        head, tail = reply.body[:length], reply.body[length:]
        out = orjson.loads(head)["outputs"][0]
        got = np.frombuffer(tail, dtype=NUMPY_DTYPES["FP32"]).reshape(out["shape"])
    else:
        out = orjson.loads(reply.body)["outputs"][0]
        got = np.asarray(out["data"], np.float32).reshape(out["shape"])
    np.testing.assert_array_equal(got, arr)
    assert (
        orjson.loads(reply.body[: int(headers.get(binary.HEADER_LENGTH_BYTES, len(reply.body)))]).get("id")
        == rid
    )
