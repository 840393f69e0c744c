"""Property-based tests (hypothesis) of the tensor validation in app/services/validation.py: any JSON a
client can send ends either in validated arrays or in a 422 ``InvalidInput`` naming a field, never in
another exception; valid tensors of every numeric datatype come back unchanged; out-of-range values,
wrong shapes and reserved parameters are refused; the v2 binary form agrees with the JSON form."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from app.errors import InvalidInput
from app.services.registry import ModelInfo, TensorSpec
from app.services.validation import (
    NUMPY_DTYPES,
    validate_outputs,
    validate_parameters,
    validate_v1_inputs,
    validate_v2_inputs,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NUMERIC = [d for d in NUMPY_DTYPES if d not in ("BYTES", "FP16")]

BATCHED = ModelInfo(
    name="ts", version="1", versions=("1",), platform="python", max_batch_size=8,
    inputs={"series": TensorSpec("series", "FP32", (-1, 4)),
            "scale": TensorSpec("scale", "FP32", (-1, 1), optional=True)},
    outputs={"forecast": TensorSpec("forecast", "FP32", (-1, 2))},
)  # fmt: skip

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


def typed_model(datatype: str, shape: tuple[int, ...] = (-1, 3)) -> ModelInfo:
    return ModelInfo(
        name="m", version="1", versions=("1",), platform="python", max_batch_size=4,
        inputs={"X": TensorSpec("X", datatype, shape)}, outputs={"Y": TensorSpec("Y", "FP32", (-1, 1))},
    )  # fmt: skip


@SETTINGS
@given(inputs=JSON)
def test_any_json_is_arrays_or_a_422_naming_a_field(inputs: Any) -> None:
    try:
        arrays = validate_v1_inputs(BATCHED, inputs)
    except InvalidInput as exc:
        assert exc.status_code == 422 and exc.details["field"].startswith("inputs")
    else:
        assert set(arrays) <= set(BATCHED.inputs) and "series" in arrays


@SETTINGS
@given(series=st.lists(st.lists(JSON, min_size=0, max_size=5), min_size=0, max_size=10))
def test_any_nested_rows_are_arrays_or_a_422(series: Any) -> None:
    try:
        arrays = validate_v1_inputs(BATCHED, {"series": series})
    except InvalidInput as exc:
        assert exc.details["field"] == "inputs.series"
    else:
        arr = arrays["series"]
        assert arr.dtype == np.float32 and arr.shape[1] == 4 and 1 <= arr.shape[0] <= 8
        assert np.isfinite(arr).all()


@SETTINGS
@given(data=st.data(), datatype=st.sampled_from(NUMERIC))
def test_valid_tensors_round_trip(data: st.DataObject, datatype: str) -> None:
    dtype = NUMPY_DTYPES[datatype]
    elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False)
    if datatype == "UINT64":  # above 2**63-1: see test_uint64_above_int64_max below
        elements = st.integers(0, 2**63 - 1)
    arr = data.draw(hnp.arrays(dtype, st.tuples(st.integers(1, 4), st.just(3)), elements=elements))
    model = typed_model(datatype)
    got = validate_v1_inputs(model, {"X": arr.tolist()})["X"]
    assert got.dtype == dtype and got.shape == arr.shape
    np.testing.assert_array_equal(got, arr)
    v2 = validate_v2_inputs(model, [{"name": "X", "shape": list(arr.shape), "datatype": datatype,
                                     "data": arr.reshape(-1).tolist()}])["X"]  # fmt: skip
    np.testing.assert_array_equal(v2, arr)
    binary = validate_v2_inputs(model, [{"name": "X", "shape": list(arr.shape), "datatype": datatype}],
                                {"X": arr.tobytes()})["X"]  # fmt: skip
    np.testing.assert_array_equal(binary, arr)


@pytest.mark.xfail(reason="found by hypothesis: a JSON row mixing small and >= 2**63 integers becomes a "
                   "float/object array, so valid UINT64 values are refused with a 422 (validation.py)",
                   strict=True)  # fmt: skip
def test_uint64_above_int64_max() -> None:
    got = validate_v1_inputs(typed_model("UINT64"), {"X": [[0, 2**63, 2**64 - 1]]})["X"]
    assert got.tolist() == [[0, 2**63, 2**64 - 1]]


@SETTINGS
@given(datatype=st.sampled_from(["INT8", "INT16", "INT32", "UINT8", "UINT16", "UINT32"]),
       over=st.integers(1, 10**6), low=st.booleans())  # fmt: skip
def test_integers_out_of_range_are_422(datatype: str, over: int, low: bool) -> None:
    info = np.iinfo(NUMPY_DTYPES[datatype])
    value = int(info.min) - over if low else int(info.max) + over
    try:
        validate_v1_inputs(typed_model(datatype), {"X": [[value, 0, 0]]})
    except InvalidInput as exc:
        assert exc.details["field"] == "inputs.X"
    else:
        raise AssertionError(f"{value} accepted as {datatype}")


@SETTINGS
@given(rows=st.integers(0, 12), cols=st.integers(0, 6))
def test_shapes_outside_the_declared_ones_are_422(rows: int, cols: int) -> None:
    value = [[1.0] * cols for _ in range(rows)]
    ok = 1 <= rows <= 8 and cols == 4
    try:
        validate_v1_inputs(BATCHED, {"series": value})
    except InvalidInput as exc:
        assert not ok and exc.details["field"] == "inputs.series"
    else:
        assert ok


@SETTINGS
@given(params=JSON)
def test_parameters_any_json(params: Any) -> None:
    try:
        out = validate_parameters(params)
    except InvalidInput as exc:
        assert exc.details["field"].startswith("parameters")
    else:
        assert isinstance(out, dict)
        assert not {"priority", "timeout"} & set(out)  # a client cannot raise its own (tiers decide)


@SETTINGS
@given(name=st.sampled_from(["priority", "timeout", "sequence_id"]), value=st.integers() | st.text())
def test_reserved_parameters_are_refused(name: str, value: Any) -> None:
    try:
        validate_parameters({name: value})
    except InvalidInput as exc:
        assert exc.details["field"] == f"parameters.{name}"
    else:
        raise AssertionError(f"{name} accepted")


@SETTINGS
@given(outputs=JSON)
def test_outputs_any_json(outputs: Any) -> None:
    try:
        out = validate_outputs(BATCHED, outputs)
    except InvalidInput as exc:
        assert exc.details["field"] == "outputs"
    else:
        assert out is None or set(out) <= set(BATCHED.outputs)


@SETTINGS
@given(inputs=JSON, blob=st.binary(max_size=64))
def test_v2_any_json_and_binary_is_arrays_or_422(inputs: Any, blob: bytes) -> None:
    try:
        validate_v2_inputs(BATCHED, inputs, {"series": blob})
    except InvalidInput as exc:
        assert exc.details["field"].startswith("inputs")
