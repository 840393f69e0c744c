"""Pure logic of the gRPC front door and the /v2 content codings: the gRPC codec (``ModelInferRequest`` ->
the same ``InferRequest`` as HTTP), the error -> status table, gzip/deflate bodies and answers."""

from __future__ import annotations

import dataclasses
import gzip
import zlib

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from app.clients.grpc_status import from_grpc
from app.clients.protocols import TritonResult
from app.codecs import encoding
from app.codecs.common import Reply
from app.errors import (
    BadRequest,
    InvalidInput,
    ModelNotFound,
    NotOffered,
    NotProxied,
    PayloadTooLarge,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
    from_http,
)
from app.frontends.grpc import codec
from app.frontends.grpc.status import grpc_code
from app.frontends.kserve_http import codec as v2
from app.services.inference import InferResponse
from app.services.registry import ModelInfo


def _request(model: str = "ts") -> service_pb2.ModelInferRequest:
    return service_pb2.ModelInferRequest(model_name=model, id="r-1")


def test_raw_and_typed_contents_decode_to_the_same_request_as_v2_json(batched: ModelInfo) -> None:
    x = np.arange(20, dtype=np.float32).reshape(1, 20, 1)
    raw = _request()
    raw.inputs.add(name="series", datatype="FP32", shape=[1, 20, 1])
    raw.raw_input_contents.append(x.tobytes())
    typed = _request()
    typed.inputs.add(name="series", datatype="FP32", shape=[1, 20, 1]).contents.fp32_contents.extend(
        x.ravel()
    )
    body = b'{"inputs": [{"name": "series", "datatype": "FP32", "shape": [1, 20, 1], "data": %s}]}' % (
        str(x.ravel().tolist()).encode()
    )
    json_req = v2.decode(batched, body, None).request
    for message in (raw, typed):
        decoded = codec.decode(batched, message)
        assert decoded.id == "r-1"
        np.testing.assert_array_equal(decoded.request.inputs["series"], json_req.inputs["series"])
        assert decoded.request.datatypes == json_req.datatypes and decoded.request.parameters == {}


def test_parameters_split_into_model_parameters_and_triton_options(batched: ModelInfo) -> None:
    batched = dataclasses.replace(
        batched, config={"sequence_batching": {}}
    )  # sequence_* need a sequence model
    message = _request()
    message.inputs.add(name="series", datatype="FP32", shape=[1, 20, 1])
    message.raw_input_contents.append(np.zeros(20, np.float32).tobytes())
    message.parameters["priority"].uint64_param = 2
    message.parameters["timeout"].int64_param = 5000
    message.parameters["sequence_id"].int64_param = 9
    message.parameters["sequence_start"].bool_param = True
    message.parameters["temperature"].double_param = 0.5
    req = codec.decode(batched, message).request
    o = req.options
    assert (o.priority, o.timeout_us, o.sequence_id, o.sequence_start) == (2, 5000, 9, True)
    assert req.parameters == {"temperature": 0.5} and not req.cacheable


def test_bad_requests_name_the_field(typed: ModelInfo, batched: ModelInfo) -> None:
    message = _request("typed")
    message.inputs.add(name="I8", datatype="INT8", shape=[2]).contents.int_contents.extend([1, 300])
    with pytest.raises(InvalidInput, match=r"inputs\.I8\.contents: value out of range for INT8"):
        codec.decode(typed, message)
    message = _request("typed")
    message.inputs.add(name="H", datatype="FP16", shape=[1])
    with pytest.raises(InvalidInput, match="raw_input_contents"):
        codec.decode(typed, message)
    message = _request()
    message.inputs.add(name="series", datatype="FP32", shape=[1, 20, 1])
    message.raw_input_contents.extend([b"", b""])
    with pytest.raises(InvalidInput, match="raw_input_contents: 2 entries for 1 inputs"):
        codec.decode(batched, message)
    message = _request()
    message.inputs.add(name="series", datatype="FP32", shape=[1, 20, 1])
    message.raw_input_contents.append(b"\0" * 8)
    with pytest.raises(InvalidInput, match=r"inputs\.series"):
        codec.decode(batched, message)
    message.parameters["priority"].string_param = "high"
    with pytest.raises(InvalidInput, match=r"parameters\.priority"):
        codec.decode(batched, message)


def test_encode_answers_with_raw_output_contents() -> None:
    out = np.array([[1.5, 2.5]], dtype=np.float32)
    text = np.array([b"a", b"bc"], dtype=np.object_)
    result = TritonResult("3", {"Y": out, "T": text}, {"Y": "FP32", "T": "BYTES"})
    reply = codec.encode(InferResponse("m", result, "HIT"), "id-7")
    assert (reply.model_name, reply.model_version, reply.id) == ("m", "3", "id-7")
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [
        ("Y", "FP32", [1, 2]),
        ("T", "BYTES", [2]),
    ]
    assert reply.raw_output_contents[0] == out.tobytes()
    assert reply.raw_output_contents[1] == b"\x01\x00\x00\x00a\x02\x00\x00\x00bc"


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (InvalidInput("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (BadRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (UpstreamUnavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (UpstreamTimeout("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (PayloadTooLarge("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (NotProxied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (NotOffered("x"), grpc.StatusCode.UNIMPLEMENTED),
        (UpstreamError("x"), grpc.StatusCode.INTERNAL),
        # Triton's own status passes through; its HTTP 400 is the client's fault
        (from_grpc(grpc.StatusCode.INTERNAL, "model failed"), grpc.StatusCode.INTERNAL),
        (from_grpc(grpc.StatusCode.INVALID_ARGUMENT, "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (from_grpc(grpc.StatusCode.FAILED_PRECONDITION, "x"), grpc.StatusCode.FAILED_PRECONDITION),
        (from_http(400, "short series"), grpc.StatusCode.INVALID_ARGUMENT),
        (from_http(500, "boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_one_table_from_domain_errors_to_grpc_codes(error: Exception, code: grpc.StatusCode) -> None:
    assert grpc_code(error) is code  # type: ignore[arg-type]


def test_compressed_bodies_are_bounded_by_their_decompressed_size() -> None:
    body = b'{"inputs": []}'
    assert encoding.decode_body(gzip.compress(body), "gzip", 1024) == body
    assert encoding.decode_body(zlib.compress(body), "deflate", 1024) == body
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    assert encoding.decode_body(raw_deflate.compress(body) + raw_deflate.flush(), "deflate", 1024) == body
    assert encoding.decode_body(body, None, 1024) == body
    bomb = gzip.compress(b" " * 10_000_000)
    assert len(bomb) < 20_000
    with pytest.raises(PayloadTooLarge, match="decompresses to more than the limit of 4096"):
        encoding.decode_body(bomb, "gzip", 4096)
    with pytest.raises(BadRequest, match="Content-Encoding: br is not supported"):
        encoding.decode_body(body, "br", 1024)
    with pytest.raises(BadRequest, match="not valid gzip"):
        encoding.decode_body(b"nope", "gzip", 1024)
    with pytest.raises(BadRequest, match="not valid gzip"):
        encoding.decode_body(gzip.compress(body)[:-12], "gzip", 1024)  # truncated


def test_answers_are_compressed_only_when_asked() -> None:
    reply = Reply(200, b"x" * 100)
    assert encoding.encode_reply(reply, None) is reply
    assert encoding.encode_reply(reply, "br") is reply
    assert encoding.encode_reply(reply, "gzip;q=0, br") is reply
    zipped = encoding.encode_reply(reply, "br, gzip")
    assert gzip.decompress(zipped.body) == reply.body and (b"content-encoding", b"gzip") in zipped.headers
    deflated = encoding.encode_reply(reply, "deflate")
    assert (
        zlib.decompress(deflated.body) == reply.body and (b"content-encoding", b"deflate") in deflated.headers
    )


def test_raw_binary_v2_request_deduces_the_shape(batched: ModelInfo, typed: ModelInfo) -> None:
    single = ModelInfo(
        name="id", version="1", versions=("1",), platform="python", max_batch_size=8,
        inputs={"X": batched.inputs["series"].__class__("X", "FP32", (-1, -1))},
        outputs={"Y": batched.outputs["forecast"]},
    )  # fmt: skip
    req = v2.decode(single, np.arange(6, dtype=np.float32).tobytes(), "0")
    assert req.request.inputs["X"].shape == (1, 6) and req.binary_outputs == {"Y"}
    with pytest.raises(InvalidInput, match="exactly one input"):
        v2.decode(typed, b"\0" * 4, "0")
    with pytest.raises(InvalidInput, match="not a whole number of FP32 values"):
        v2.decode(single, b"\0" * 5, "0")
