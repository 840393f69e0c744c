"""Targets and the request bodies each one sends.

Every request carries one row (batch 1). A body's first three values are (run salt, connection id,
sequence number): unique across the run and across runs, so a ``unique`` target never hits the cache;
a ``repeated`` target cycles through a small pool of bodies, so after the warm-up every request is a hit.
Values are small integers, exact in FP32, so every target sends the same tensor for the same numbers.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import orjson

Kind = Literal["http", "grpc"]
Body = Literal["v1", "v2", "v2bin", "grpc"]

HIT_POOL = 32  # distinct bodies of a repeated target


@dataclass(frozen=True)
class ModelSpec:
    name: str
    input: str
    row_shape: tuple[int, ...]  # one row, without the batch dim
    datatype: str = "FP32"

    @property
    def row_size(self) -> int:
        n = 1
        for d in self.row_shape:
            n *= d
        return n


# The two benchmark models: a transport-bound identity and the small forecasting transformer.
TINY = ModelSpec("identity_fp32", "INPUT0", (16,))
TIMESERIES = ModelSpec("transformer_timeseries", "series", (20, 1))
MODELS = {m.name: m for m in (TINY, TIMESERIES)}


@dataclass(frozen=True)
class TargetSpec:
    """One thing to load: where to send, what to send. Picklable (it crosses into generator processes)."""

    name: str
    kind: Kind
    host: str
    port: int
    path: str
    body: Body
    unique: bool
    model: ModelSpec
    salt: int
    headers: str = ""  # extra request header lines ("Name: value\r\n"), e.g. the API key

    @property
    def label(self) -> str:
        return self.name


TARGET_NAMES = ("triton-http", "triton-grpc", "gateway-miss", "gateway-hit", "gateway-v2",
                "gateway-grpc-miss", "gateway-grpc-hit")  # fmt: skip
EXTRA_TARGETS = ("triton-http-bin", "gateway-v2-bin")  # named with --targets (the cost-per-request table)
TARGET_HELP = {
    "triton-http": "Triton direct, HTTP/REST (KServe v2 JSON), unique inputs",
    "triton-grpc": "Triton direct, gRPC (ModelInfer, raw tensor bytes), unique inputs",
    "gateway-miss": "gateway /v1 JSON, unique inputs (every request a cache miss)",
    "gateway-hit": f"gateway /v1 JSON, {HIT_POOL} repeated inputs (cache hits after warm-up)",
    "gateway-v2": "gateway /v2 (KServe v2 JSON, as Triton direct HTTP), unique inputs",
    "triton-http-bin": "Triton direct, HTTP/REST with binary tensors (binary_data_size, binary_data_output), "
    "unique inputs",
    "gateway-v2-bin": "gateway /v2 with binary tensors (as triton-http-bin), unique inputs",
    "gateway-grpc-miss": "gateway gRPC front door (ModelInfer, as triton-grpc), unique inputs",
    "gateway-grpc-hit": f"gateway gRPC front door, {HIT_POOL} repeated inputs (cache hits after warm-up)",
    "gateway-miss-key": "gateway-miss with TGW_AUTH=required and an API key (authentication + limits)",
    "gateway-hit-key": "gateway-hit with TGW_AUTH=required and an API key (authentication + limits)",
}
KEY_TARGETS = ("gateway-miss-key", "gateway-hit-key")  # the auth phase: the gateway restarted with keys on


def key_targets(model: ModelSpec, gateway: tuple[str, int], salt: int, api_key: str) -> list[TargetSpec]:
    """gateway-miss and gateway-hit again, each request carrying ``Authorization: Bearer <api_key>``."""
    m, header = model.name, f"Authorization: Bearer {api_key}\r\n"
    return [
        TargetSpec(
            "gateway-miss-key", "http", *gateway, f"/v1/models/{m}/infer", "v1", True, model, salt, header
        ),
        TargetSpec(
            "gateway-hit-key", "http", *gateway, f"/v1/models/{m}/infer", "v1", False, model, salt, header
        ),
    ]


def make_targets(
    model: ModelSpec, triton_http: tuple[str, int], triton_grpc: tuple[str, int], gateway: tuple[str, int],
    salt: int, names: tuple[str, ...] = TARGET_NAMES, gateway_grpc: tuple[str, int] = ("127.0.0.1", 0),
) -> list[TargetSpec]:  # fmt: skip
    m = model.name
    all_targets = {
        "triton-http": TargetSpec("triton-http", "http", *triton_http, f"/v2/models/{m}/infer", "v2", True,
                                  model, salt),
        "triton-grpc": TargetSpec("triton-grpc", "grpc", *triton_grpc, m, "grpc", True, model, salt),
        "gateway-miss": TargetSpec("gateway-miss", "http", *gateway, f"/v1/models/{m}/infer", "v1", True,
                                   model, salt),
        "gateway-hit": TargetSpec("gateway-hit", "http", *gateway, f"/v1/models/{m}/infer", "v1", False,
                                  model, salt),
        "gateway-v2": TargetSpec("gateway-v2", "http", *gateway, f"/v2/models/{m}/infer", "v2", True,
                                 model, salt),
        "triton-http-bin": TargetSpec("triton-http-bin", "http", *triton_http, f"/v2/models/{m}/infer",
                                      "v2bin", True, model, salt),
        "gateway-v2-bin": TargetSpec("gateway-v2-bin", "http", *gateway, f"/v2/models/{m}/infer", "v2bin",
                                     True, model, salt),
        "gateway-grpc-miss": TargetSpec("gateway-grpc-miss", "grpc", *gateway_grpc, m, "grpc", True,
                                        model, salt),
        "gateway-grpc-hit": TargetSpec("gateway-grpc-hit", "grpc", *gateway_grpc, m, "grpc", False,
                                       model, salt),
    }  # fmt: skip
    return [all_targets[n] for n in names]


def _row_values(model: ModelSpec, head: tuple[int, int, int]) -> list[float]:
    fill = [float(i % 7) for i in range(3, model.row_size)]
    return [float(v) for v in head][: model.row_size] + fill


def _nest(flat: list[float], shape: tuple[int, ...]) -> object:
    if len(shape) == 1:
        return flat
    step = len(flat) // shape[0]
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


_MARK = (1.5e38, 2.5e38, 3.5e38)  # placeholders, replaced by %d after rendering


def _json_template(target: TargetSpec) -> bytes:
    """The JSON body with %d placeholders where salt, connection and sequence go."""
    model = target.model
    flat = _row_values(model, (0, 0, 0))
    flat[: min(3, len(flat))] = list(_MARK[: min(3, len(flat))])
    batch_shape = [1, *model.row_shape]
    if target.body == "v1":
        doc: object = {"inputs": {model.input: [_nest(flat, model.row_shape)]}}
    else:
        doc = {"inputs": [{"name": model.input, "shape": batch_shape, "datatype": model.datatype,
                           "data": flat}]}  # fmt: skip
    text = orjson.dumps(doc)
    for mark in _MARK:
        text = text.replace(orjson.dumps(mark), b"%d.0")
    return text


def _binary_request(target: TargetSpec, conn_id: int) -> Callable[[int], bytes]:
    """The binary tensor extension: a JSON header naming ``binary_data_size``, the raw little-endian row
    after it (``Inference-Header-Content-Length``), binary outputs asked for (``binary_data_output``)."""
    model = target.model
    size = model.row_size * 4
    header = orjson.dumps({
        "inputs": [{"name": model.input, "shape": [1, *model.row_shape], "datatype": model.datatype,
                    "parameters": {"binary_data_size": size}}],
        "parameters": {"binary_data_output": True},
    })  # fmt: skip
    head = (
        f"POST {target.path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n{target.headers}"
        f"Content-Type: application/octet-stream\r\nInference-Header-Content-Length: {len(header)}\r\n"
        f"Content-Length: {len(header) + size}\r\n\r\n"
    ).encode() + header
    fill = struct.pack(f"<{model.row_size - 3}f", *_row_values(model, (0, 0, 0))[3:])
    row = struct.Struct("<3f")
    salt = target.salt
    if target.unique:
        return lambda seq: head + row.pack(salt, conn_id, seq) + fill
    pool = [head + row.pack(salt, 0, i) + fill for i in range(HIT_POOL)]
    return lambda seq: pool[seq % HIT_POOL]


def http_request_factory(target: TargetSpec, conn_id: int) -> Callable[[int], bytes]:
    """seq -> the full HTTP/1.1 request (keep-alive) for this connection's ``seq``-th request."""
    if target.body == "v2bin":
        return _binary_request(target, conn_id)
    template = _json_template(target)
    head = (
        f"POST {target.path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\n{target.headers}"
        "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    ).encode()
    salt = target.salt
    if target.unique:

        def make(seq: int) -> bytes:
            body = template % (salt, conn_id, seq)
            return head % len(body) + body

        return make
    pool = [template % (salt, 0, i) for i in range(HIT_POOL)]
    requests = [head % len(b) + b for b in pool]

    def make_repeated(seq: int) -> bytes:
        return requests[seq % HIT_POOL]

    return make_repeated


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def grpc_request_factory(target: TargetSpec, conn_id: int) -> Callable[[int], bytes]:
    """seq -> a serialised ``ModelInferRequest``: a fixed prefix plus ``raw_input_contents`` (field 7),
    appended as bytes (protobuf fields may come in any order)."""
    from tritonclient.grpc import service_pb2

    model = target.model
    req = service_pb2.ModelInferRequest(model_name=model.name)
    tensor = req.inputs.add()
    tensor.name = model.input
    tensor.datatype = model.datatype
    tensor.shape.extend([1, *model.row_shape])
    prefix = req.SerializeToString()
    fill = struct.pack(f"<{model.row_size - 3}f", *_row_values(model, (0, 0, 0))[3:])
    head = struct.Struct("<3f")
    tag_len = b"\x3a" + _varint(model.row_size * 4)
    salt = target.salt

    def make(seq: int) -> bytes:
        return prefix + tag_len + head.pack(salt, conn_id, seq) + fill

    if target.unique:
        return make
    pool = [prefix + tag_len + head.pack(salt, 0, i) + fill for i in range(HIT_POOL)]
    return lambda seq: pool[seq % HIT_POOL]
