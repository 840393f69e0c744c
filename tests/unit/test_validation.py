from __future__ import annotations

import numpy as np
import pytest

from app.errors import InvalidInput
from app.services.registry import ModelInfo
from app.services.validation import (
    validate_outputs,
    validate_parameters,
    validate_v1_inputs,
    validate_v2_inputs,
)


def series(batch: int = 1, length: int = 20) -> list[list[list[float]]]:
    return [[[float(i)] for i in range(length)] for _ in range(batch)]


def test_valid_batch_becomes_fp32_array(batched: ModelInfo) -> None:
    out = validate_v1_inputs(batched, {"series": series(3)})
    assert out["series"].dtype == np.float32 and out["series"].shape == (3, 20, 1)


def test_ints_are_accepted_for_float_inputs(batched: ModelInfo) -> None:
    data = [[[i] for i in range(20)]]
    assert validate_v1_inputs(batched, {"series": data})["series"].dtype == np.float32


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (series(1, 19), "expected shape [-1, 20, 1], got [1, 19, 1]"),
        (series(9), "batch size 9 is outside 1..8"),
        ([[[1.0]] * 20, [[1.0]] * 19], "ragged"),
        ([[["x"]] * 20], "expected numbers for FP32"),
        ([[[float("nan")]] * 20], "NaN or infinite"),
        ([[[1e39]] * 20], "out of FP32 range"),
        ([[[True]] * 20], "expected numbers"),
        (3.0, "expected a nested list"),
    ],
)
def test_bad_series(batched: ModelInfo, value: object, fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_v1_inputs(batched, {"series": value})
    assert fragment in info.value.message
    assert info.value.details["field"] == "inputs.series"


def test_batch_sizes_must_agree(batched: ModelInfo) -> None:
    with pytest.raises(InvalidInput, match="disagree on the batch size"):
        validate_v1_inputs(batched, {"series": series(2), "scale": [[1.0]]})


def test_nonfinite_allowed_by_model_option(batched: ModelInfo) -> None:
    from dataclasses import replace

    lenient = replace(batched, allow_nonfinite=True)
    out = validate_v1_inputs(lenient, {"series": [[[float("inf")]] * 20]})
    assert np.isinf(out["series"]).all()


def test_names(batched: ModelInfo) -> None:
    with pytest.raises(InvalidInput, match="has no input 'x'"):
        validate_v1_inputs(batched, {"series": series(), "x": [[1.0]]})
    with pytest.raises(InvalidInput, match="required input is missing"):
        validate_v1_inputs(batched, {"scale": [[1.0]]})
    with pytest.raises(InvalidInput, match="expected an object"):
        validate_v1_inputs(batched, [])


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("I8", [-129, 0], "out of range for INT8 (-128..127)"),
        ("I8", [1.0, 2.0], "expected integers"),
        ("U16", [-1], "out of range for UINT16"),
        ("U16", [2**70], "expected integers"),
        ("B", [0], "true/false"),
        ("S", [1], "strings"),
        ("H", [65520.0], "FP16"),
    ],
)
def test_datatype_fit(typed: ModelInfo, name: str, value: object, fragment: str) -> None:
    good: dict[str, object] = {"I8": [1, 2], "U16": [7], "B": [True], "S": ["a", "b"], "H": [0.5]}
    good[name] = value
    with pytest.raises(InvalidInput) as info:
        validate_v1_inputs(typed, good)
    assert fragment in info.value.message and info.value.details["field"] == f"inputs.{name}"


def test_typed_happy_path(typed: ModelInfo) -> None:
    out = validate_v1_inputs(typed, {"I8": [-128, 127], "U16": [65535], "B": [False], "S": ["é"], "H": [1.5]})
    assert out["I8"].dtype == np.int8 and out["U16"].dtype == np.uint16 and out["B"].dtype == np.bool_
    assert out["S"].tolist() == ["é".encode()] and out["H"].dtype == np.float16


def test_outputs_and_parameters(batched: ModelInfo) -> None:
    assert validate_outputs(batched, None) is None
    assert validate_outputs(batched, ["forecast", "forecast"]) == ["forecast"]
    with pytest.raises(InvalidInput):
        validate_outputs(batched, ["nope"])
    assert validate_parameters({"a": 1, "b": "x"}) == {"a": 1, "b": "x"}
    with pytest.raises(InvalidInput, match="reserved"):
        validate_parameters({"sequence_id": 1})
    with pytest.raises(InvalidInput):
        validate_parameters({"a": {"nested": 1}})


def test_v2_json_and_binary(batched: ModelInfo) -> None:
    flat = [float(i) for i in range(40)]
    out = validate_v2_inputs(
        batched, [{"name": "series", "shape": [2, 20, 1], "datatype": "FP32", "data": flat}]
    )
    assert out["series"].shape == (2, 20, 1)
    raw = np.arange(20, dtype=np.float32).tobytes()
    out = validate_v2_inputs(
        batched, [{"name": "series", "shape": [1, 20, 1], "datatype": "FP32"}], {"series": raw}
    )
    assert out["series"][0, 19, 0] == 19.0
    with pytest.raises(InvalidInput, match="binary data is 80 bytes"):
        validate_v2_inputs(
            batched, [{"name": "series", "shape": [2, 20, 1], "datatype": "FP32"}], {"series": raw}
        )
    with pytest.raises(InvalidInput, match="expected FP32, got FP64"):
        validate_v2_inputs(
            batched, [{"name": "series", "shape": [1, 20, 1], "datatype": "FP64", "data": flat}]
        )


@pytest.mark.parametrize(
    "value",
    [
        [[[1.0]] * 19 + [[True]]],
        [[[0.0]] * 19 + [[False]]],
        [[[True]] + [[2.5]] * 19],
    ],
)
def test_booleans_are_not_numbers_for_float_inputs(batched: ModelInfo, value: object) -> None:
    with pytest.raises(InvalidInput) as info:
        validate_v1_inputs(batched, {"series": value})
    assert info.value.details["field"] == "inputs.series"
    assert "true/false" in info.value.message


def test_booleans_are_not_numbers_for_int_inputs(typed: ModelInfo) -> None:
    good = {"I8": [1, 0], "U16": [1], "B": [True], "S": ["x"], "H": [1.0]}
    assert validate_v1_inputs(typed, good)["I8"].tolist() == [1, 0]
    for name, value in (("I8", [1, True]), ("U16", [False]), ("H", [True])):
        with pytest.raises(InvalidInput) as info:
            validate_v1_inputs(typed, {**good, name: value})
        assert info.value.details["field"] == f"inputs.{name}"


def test_booleans_in_v2_data(batched: ModelInfo) -> None:
    tensor = {"name": "series", "shape": [1, 20, 1], "datatype": "FP32", "data": [0.5] * 19 + [True]}
    with pytest.raises(InvalidInput, match="true/false"):
        validate_v2_inputs(batched, [tensor])


@pytest.mark.parametrize("value", ["abc", [1, 2], 3, True])
@pytest.mark.parametrize("field", ["parameters", "inputs.series.parameters", "outputs.forecast.parameters"])
def test_parameters_not_an_object_is_a_422_naming_the_field(value: object, field: str) -> None:
    from app.services.validation import parameters_object

    with pytest.raises(InvalidInput) as info:
        parameters_object(value, field)
    assert info.value.details["field"] == field
    assert info.value.status_code == 422
    with pytest.raises(InvalidInput) as info:
        validate_parameters(value, field)
    assert info.value.details["field"] == field
    assert parameters_object(None, field) == {}
    assert parameters_object({"binary_data": True}, field) == {"binary_data": True}
