"""Client-input robustness of JSON decoding (issue 15): nesting depth and oversize value counts are
refused with a 4xx naming the problem, before any nested Python list is built."""

from __future__ import annotations

import time

import orjson
import pytest

from app.errors import BadRequest, InvalidInput
from app.services.payload import MAX_JSON_DEPTH, check_value_budget, count_values, parse_json
from app.services.registry import ModelInfo
from app.services.validation import value_budget


def nested(depth: int, inner: bytes = b"1") -> bytes:
    return b"[" * depth + inner + b"]" * depth


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 300, 1025, 2000, 100_000])
def test_too_deep_is_a_400_naming_the_limit(depth: int) -> None:
    for body in (nested(depth), b'{"inputs": {"x": ' + nested(depth) + b"}}"):
        with pytest.raises(BadRequest) as err:
            parse_json(body)
        assert err.value.details == {"field": "body", "max_depth": MAX_JSON_DEPTH}
        assert f"nested more than {MAX_JSON_DEPTH} levels" in err.value.message


def test_depth_at_the_limit_is_accepted() -> None:
    assert parse_json(nested(MAX_JSON_DEPTH)) is not None
    assert parse_json(b'{"a": {"b": ' + nested(MAX_JSON_DEPTH - 2) + b"}}")["a"]["b"]


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    body = b'{"note": "' + b"[" * 500 + b"]]]{" + b'", "x": ' + nested(10) + b"}"
    assert parse_json(body)["note"].startswith("[[[")
    deep = b'{"note": "' + b"[" * 500 + b'", "x": ' + nested(MAX_JSON_DEPTH) + b"}"
    with pytest.raises(BadRequest, match="nested more than"):
        parse_json(deep)


def test_too_deep_with_nan_fallback_and_str_frames() -> None:
    with pytest.raises(BadRequest, match="nested more than"):
        parse_json(nested(3000, b"NaN").decode())  # a WebSocket text frame, Python-json fallback path
    assert parse_json("[NaN]") != [0]  # NaN still reaches validation (a 422 naming the input there)


def test_invalid_json_keeps_its_message() -> None:
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_json(b"[[[")


def test_count_values_ignores_commas_in_strings() -> None:
    assert count_values(b'{"a": "x,y,z", "b": [1, 2, [3, 4]]}') == 5
    assert count_values(orjson.dumps([[[0.5]] * 20] * 7)) == 140


def test_value_budget_of_a_model(batched: ModelInfo) -> None:
    assert value_budget(batched) == 8 * 20 + 8 * 1  # max_batch_size x dims, every input


def test_oversize_body_refused_before_parsing(batched: ModelInfo) -> None:
    """The 7.3 MB nested list of the issue: refused from its bytes in milliseconds (parsing it and
    building the array took ~0.5 s of event-loop CPU on the 2-core dev machine)."""
    body = orjson.dumps({"inputs": {"series": [[[0.5878]] * 20] * 40_000}})
    assert len(body) > 7_000_000
    start = time.perf_counter()
    with pytest.raises(InvalidInput) as err:
        check_value_budget(body, value_budget(batched), what="model 'ts'")
    elapsed = time.perf_counter() - start
    assert err.value.details["received"] == {"values": 800_000}
    assert err.value.details["field"] == "inputs"
    assert elapsed < 0.1, f"budget check took {elapsed:.3f} s"
    with pytest.raises(InvalidInput, match="800000 values"):
        parse_json(body, max_values=value_budget(batched))  # the same, as the codecs call it


def test_budget_passes_real_requests(batched: ModelInfo) -> None:
    body = orjson.dumps({"inputs": {"series": [[[0.5]] * 20] * 8}, "parameters": {"note": "a," * 10_000}})
    check_value_budget(body, value_budget(batched))  # commas inside strings are not values
    check_value_budget(orjson.dumps(list(range(10**6))), None)  # no bound known: nothing refused


def test_both_codecs_apply_the_value_budget_and_parameter_shapes(batched: ModelInfo) -> None:
    from app.frontends.kserve_http import codec as v2
    from app.frontends.rest import codec as v1

    budget = value_budget(batched)
    assert budget is not None
    too_many = orjson.dumps({"inputs": {"series": [[[0.5]] * 20] * (budget // 20 + 1)}})
    with pytest.raises(InvalidInput):
        v1.decode(batched, too_many)
    series = {"name": "series", "shape": [1, 20, 1], "datatype": "FP32", "data": [0.5] * 20}
    huge = orjson.dumps({"inputs": [{**series, "shape": [budget, 1, 1], "data": [0.5] * (budget + 20)}]})
    with pytest.raises(InvalidInput):
        v2.decode(batched, huge, None)
    bad_params = orjson.dumps({"inputs": [{**series, "parameters": [1]}]})
    with pytest.raises(InvalidInput) as err:
        v2.decode(batched, bad_params, None)
    assert err.value.details["field"] == "inputs.series.parameters"


def test_a_large_body_orjson_refuses_is_not_parsed_again_by_pythons_json() -> None:
    """Above SLOW_PARSE_MAX_BYTES only orjson's verdict is given (Python's json would hold the interpreter
    lock ~0.35 s for 7 MB); a NaN/Infinity literal is still a 422, naming the body."""
    from app.errors import InvalidInput
    from app.services.payload import SLOW_PARSE_MAX_BYTES

    numbers = b"1.25," * (SLOW_PARSE_MAX_BYTES // 5 + 1)
    with pytest.raises(InvalidInput) as nan:
        parse_json(b'{"inputs": {"x": [[' + numbers + b"NaN]]}}")
    assert nan.value.details == {"field": "body", "expected": "finite numbers"}
    with pytest.raises(BadRequest, match="not valid JSON"):
        parse_json(b'{"inputs": {"x": [[' + numbers + b"1.0]]}")
    small = parse_json(b'{"inputs": {"x": [[1.25, NaN]]}}')  # small: parsed, validation names the input
    assert small["inputs"]["x"][0][0] == 1.25
