"""Issue 19, pure logic of the door's checks: the arrays-per-body bound, the linear depth check, lone
surrogates, and the codecs' refusals (the real-stack tests are tests/integration/test_edge_validation.py)."""

from __future__ import annotations

import dataclasses
import json
import time
from functools import partial

import numpy as np
import orjson
import pytest
from tritonclient.grpc import service_pb2

from app.errors import BadRequest, InvalidInput
from app.frontends.grpc import codec as grpc_codec
from app.frontends.kserve_http import codec as v2
from app.frontends.rest import codec as v1
from app.services.payload import (
    ANY_MODEL,
    MAX_JSON_DEPTH,
    ContainerBudget,
    _bracket_depth,
    check_containers,
    parse_json,
)
from app.services.registry import ModelInfo, TensorSpec
from app.services.validation import container_budget


@pytest.fixture
def identity() -> ModelInfo:
    return ModelInfo(
        name="identity_fp32", version="1", versions=("1",), platform="python", max_batch_size=64,
        inputs={"INPUT0": TensorSpec("INPUT0", "FP32", (-1, -1))},
        outputs={"OUTPUT0": TensorSpec("OUTPUT0", "FP32", (-1, -1))},
    )  # fmt: skip


def test_container_budget_follows_the_shape(identity: ModelInfo, batched: ModelInfo) -> None:
    # identity [batch<=64, -1]: the tensor's array and one per row; 4 per tensor entry (v2 structure)
    assert container_budget(identity) == ContainerBudget(4 * 2 + 1 + 64, 0)
    # ts: series [8, 20, 1] -> 1 + 8 + 160 arrays, scale [8, 1] -> 1 + 8
    assert container_budget(batched) == ContainerBudget(4 * 3 + 1 + 8 + 160 + 1 + 8, 0)
    image = dataclasses.replace(identity, inputs={"IMG": TensorSpec("IMG", "FP32", (-1, 3, -1, -1))})
    assert container_budget(image) == ContainerBudget(4 * 2 + 1 + 64 + 192, 1)  # rows below H: one per value


def test_legitimate_bodies_pass_the_bounds(identity: ModelInfo, batched: ModelInfo) -> None:
    rows = orjson.dumps({"inputs": {"INPUT0": np.zeros((64, 50_000), np.float32).tolist()}})
    assert v1.decode(identity, rows).inputs["INPUT0"].shape == (64, 50_000)
    series = orjson.dumps({"inputs": {"series": [[[0.5]] * 20] * 8, "scale": [[1.0]] * 8}})
    assert v1.decode(batched, series).inputs["series"].shape == (8, 20, 1)
    # brackets and commas inside strings are not structure
    noisy = orjson.dumps({"inputs": {"INPUT0": [[1.0, 2.0]]}, "parameters": {"note": "[[[]]], " * 5000}})
    assert v1.decode(identity, noisy).parameters["note"].startswith("[[[")
    many = orjson.dumps({"x": ["[[]]"] * 10_000})  # many strings: counted apart in numpy
    check_containers(many, ContainerBudget(2, 0))


@pytest.mark.parametrize("make", [
    lambda n: b"[" * (n // 2) + b"]" * (n // 2),
    lambda n: b"[" + b",".join([b"[[]]"] * (n // 5)) + b"]",
    lambda n: b"[" + b",".join([b"[ [ ] ]"] * (n // 8)) + b"]",  # whitespace does not hide empty arrays
])  # fmt: skip
def test_array_bombs_are_refused_from_the_bytes(identity: ModelInfo, make: object) -> None:
    tensor = make(7_300_000)  # type: ignore[operator]
    for body in (b'{"inputs": {"INPUT0": ' + tensor + b"}}", tensor):
        for decode in (partial(v1.decode, identity), parse_json):
            start = time.perf_counter()
            with pytest.raises((InvalidInput, BadRequest)) as err:
                decode(body)
            assert time.perf_counter() - start < 0.25  # was 1.6 s / 2.8 s
            assert err.value.details["field"] in ("inputs", "body")


def test_values_buy_arrays_only_below_a_variable_dimension() -> None:
    rows = b"[" + b",".join([b"[[1.5]]"] * 1000) + b"]"
    check_containers(rows, ContainerBudget(0, 2))  # 2001 arrays for 1000 values: fits 2 per value
    with pytest.raises(InvalidInput, match="arrays and objects"):
        check_containers(rows, ContainerBudget(0, 1))
    check_containers(rows, ANY_MODEL)


def test_depth_is_checked_in_one_linear_pass() -> None:
    assert _bracket_depth(b"[" * 64 + b"]" * 64, 64) == "ok"
    assert _bracket_depth(b"[" * 65 + b"]" * 65, 64) == "deep"
    assert _bracket_depth(b"[[]", 64) == "unbalanced" and _bracket_depth(b"]][[", 64) == "unbalanced"
    pad = b"[]" * 2000  # large skeletons: the numpy pass
    assert _bracket_depth(b"[" * 63 + pad + b"]" * 63, 64) == "ok"  # pad adds a level
    assert _bracket_depth(b"[" * 64 + pad + b"]" * 64, 64) == "deep"
    assert _bracket_depth(pad + b"][", 64) == "unbalanced" and _bracket_depth(b"[" + pad, 64) == "unbalanced"
    alternating = b"[0," * 65 + b"0" + b"]" * 65  # deep without 65 consecutive openers
    assert _bracket_depth(alternating, 64) == "deep"
    with pytest.raises(BadRequest, match=f"nested more than {MAX_JSON_DEPTH}"):
        parse_json(b'{"a": ' + alternating + b"}", containers=ContainerBudget(10_000, 0))


@pytest.mark.parametrize(("body", "field"), [
    (b'{"inputs": [{"name": "\\ud800"}]}', "inputs[0].name"),
    (b'{"a": [NaN], "b": {"\\udfff": 1}}', "b.\\udfff"),
    (b'{"parameters": {"p": "x\\udc00"}}', "parameters.p"),
])  # fmt: skip
def test_lone_surrogates_are_refused_naming_the_field(body: bytes, field: str) -> None:
    for raw in (body, body.decode()):
        with pytest.raises(BadRequest) as err:
            parse_json(raw)
        assert err.value.details == {"field": field}
        orjson.dumps(err.value.message)  # the message itself is text
    assert parse_json(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}  # a pair is fine


def test_v2_refusals_name_the_field(identity: ModelInfo) -> None:
    row = {"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}

    def field_of(body: dict[str, object]) -> str:
        with pytest.raises(InvalidInput) as err:
            v2.decode(identity, orjson.dumps(body), None)
        return str(err.value.details["field"])

    assert field_of({"inputs": [{**row, "shape": [True, 2]}]}) == "inputs.INPUT0.shape"
    assert field_of({"inputs": [row, row]}) == "inputs.INPUT0"
    assert field_of({"inputs": [{**row, "parameters": {"shared_memory_region": "r"}}]}) == (
        "inputs.INPUT0.parameters.shared_memory_region"
    )
    top = {"inputs": [row], "outputs": [{"name": "OUTPUT0", "parameters": {"classification": 2}}]}
    assert v2.decode(identity, orjson.dumps(top), None).request.classification == {"OUTPUT0": 2}
    top["outputs"][0]["parameters"]["classification"] = True  # type: ignore[index]
    assert field_of(top) == "outputs.OUTPUT0.parameters.classification"
    assert field_of({"inputs": [row], "parameters": {"sequence_id": 3}}) == "parameters.sequence_id"
    assert field_of({"inputs": [row], "parameters": {"priority": -1}}) == "parameters.priority"
    assert field_of({"inputs": [row], "parameters": {"triton_x": 1}}) == "parameters.triton_x"
    sequence = dataclasses.replace(identity, config={"sequence_batching": {}})
    for value, ok in ((-5, False), ("s" * 128, True), ("s" * 129, False), (2**64 - 1, True), (2**64, False)):
        body = json.dumps({"inputs": [row], "parameters": {"sequence_id": value}}).encode()
        if ok:
            assert v2.decode(sequence, body, None).request.options.sequence_id == value
        else:
            with pytest.raises(InvalidInput, match=r"parameters\.sequence_id"):
                v2.decode(sequence, body, None)


def test_grpc_refusals_name_the_field(identity: ModelInfo) -> None:
    def message() -> service_pb2.ModelInferRequest:
        m = service_pb2.ModelInferRequest(model_name="identity_fp32")
        m.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2])
        m.raw_input_contents.append(np.zeros(2, np.float32).tobytes())
        return m

    both = message()
    both.inputs[0].contents.fp32_contents.extend([1.0, 2.0])
    shm = message()
    shm.inputs[0].parameters["shared_memory_offset"].int64_param = 0
    out = message()
    out.outputs.add(name="OUTPUT0").parameters["classification"].int64_param = 3
    assert grpc_codec.decode(identity, out).request.classification == {"OUTPUT0": 3}
    out.outputs[0].parameters["classification"].int64_param = -1
    final = message()
    final.parameters["triton_enable_empty_final_response"].bool_param = True
    consumed = grpc_codec.decode(identity, final)  # a flag of the stream, as Triton's gRPC front end reads it
    assert consumed.request.parameters == {} and consumed.empty_final_response is True
    for bad, field in ((both, "inputs.INPUT0.contents"), (shm, "inputs.INPUT0.parameters.shared_memory_offset"),
                       (out, "outputs.OUTPUT0.parameters.classification")):  # fmt: skip
        with pytest.raises(InvalidInput) as err:
            grpc_codec.decode(identity, bad)
        assert err.value.details["field"] == field
