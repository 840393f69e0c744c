"""The generate extension's codec (``app.frontends.kserve_http.generate``): Triton 2.51's request mapping
(inputs by key, shaped as Triton shapes them; ``parameters``; other keys as request parameters) and its
answer (one-element outputs as a value, others flat, FP32 widened as Triton writes it). The end-to-end
comparison with the embedded Triton is tests/integration/test_sse.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from app.clients.protocols import TritonResult
from app.domain import InferResponse
from app.errors import InvalidInput
from app.frontends.kserve_http import generate
from app.services.registry import ModelInfo, TensorSpec

STREAM = ModelInfo(
    name="fs", version="1", versions=("1",), platform="python", max_batch_size=0,
    inputs={"series": TensorSpec("series", "FP32", (-1,)), "horizon": TensorSpec("horizon", "INT32", (1,))},
    outputs={"step": TensorSpec("step", "INT32", (1,)), "value": TensorSpec("value", "FP32", (1,))},
)  # fmt: skip


@pytest.mark.parametrize(
    ("dims", "count", "shape"),
    [((-1,), 30, [30]), ((1,), 1, [1]), ((-1, -1), 2, [1, 2]), ((-1, 3), 6, [2, 3]), ((2, -1), 6, [2, 3])],
)
def test_tensor_shape_is_tritons(dims: tuple[int, ...], count: int, shape: list[int]) -> None:
    assert generate.tensor_shape("x", dims, count) == shape


def test_a_count_that_does_not_fit_the_shape_is_refused() -> None:
    with pytest.raises(InvalidInput, match="can not convert input 'x'"):
        generate.tensor_shape("x", (-1, 3), 4)


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_inputs_parameters_and_id() -> None:
    gen = generate.decode(STREAM, body(series=[1.0] * 25, horizon=3, id="a", temperature=0.5,
                                       parameters={"top": 2, "priority": 1}))  # fmt: skip
    req = gen.request
    assert gen.id == "a"
    assert req.inputs["series"].shape == (25,) and req.inputs["series"].dtype == np.float32
    assert req.inputs["horizon"].tolist() == [3] and req.inputs["horizon"].dtype == np.int32
    assert req.parameters == {"temperature": 0.5, "top": 2}  # "id" is echoed, not a parameter
    assert req.options.priority == 1  # Triton's own parameter


def test_an_input_inside_parameters_is_an_input() -> None:
    req = generate.decode(STREAM, body(series=[1.0] * 25, parameters={"horizon": 4})).request
    assert req.inputs["horizon"].tolist() == [4] and req.parameters == {}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (body(series=[1.0] * 25), "horizon"),
        (body(series=[[1.0]] * 25, horizon=3), "series"),
        (body(series=[1.0] * 25, horizon=3, extra=[1]), "extra"),
        (body(series=[1.0] * 25, horizon=3, parameters=[1]), "parameters"),
        (body(series=[1.0] * 25, horizon=3, id=7), "id"),
        (b"[1, 2]", "body"),
    ],
    ids=["missing", "nested", "list-parameter", "parameters-not-object", "id-not-string", "not-an-object"],
)
def test_bad_bodies_name_the_field(raw: bytes, field: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        generate.decode(STREAM, raw)
    assert caught.value.details["field"] == field


def test_the_answer_is_tritons() -> None:
    result = TritonResult(
        "1", {"step": np.array([2], np.int32), "value": np.array([63.28037643432617], np.float32),
              "many": np.arange(6, dtype=np.float32).reshape(2, 3), "text": np.array([b"hi"], np.object_)},
        {"step": "INT32", "value": "FP32", "many": "FP32", "text": "BYTES"}, final=False,
    )  # fmt: skip
    answer = generate.answer(InferResponse("fs", result, "MISS"), "req-1")
    assert answer == {"id": "req-1", "many": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], "model_name": "fs",
                      "model_version": "1", "step": 2, "text": "hi", "value": 63.28037643432617}  # fmt: skip
    assert list(answer) == sorted(answer)  # Triton's order (its std::map)
    assert json.loads(generate.reply(InferResponse("fs", result, "MISS"), None).body)["value"] == float(
        np.float32(63.28037643432617)
    )
