"""Validate tensors against the model's metadata with numpy, before anything reaches Triton.

No per-element Python work: nested lists become arrays in one ``np.asarray`` call; dtype, range,
finiteness and shape checks are vectorised. Every failure is an ``InvalidInput`` (422) naming the
input and saying what was expected and what was received.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
from tritonclient.utils import deserialize_bytes_tensor

from app.domain import CallOptions, InferRequest
from app.errors import InvalidInput
from app.services.payload import ContainerBudget
from app.services.registry import ModelInfo, TensorSpec

NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
_RESERVED_PARAMETERS = frozenset(
    {"sequence_id", "sequence_start", "sequence_end", "priority", "binary_data_output", "timeout"}
)


# Triton's own parameters a client may pass (relayed as given): a decoupled model's stream option.
_TRITON_STREAM_OPTIONS = frozenset({"triton_enable_empty_final_response"})
_IS_BOOL = partial(operator.is_, bool)


def _contains_bool(value: list[Any]) -> bool:
    """A ``true``/``false`` anywhere in a nested list (per element in C: ``map`` over ``type``)."""
    stack = [value]
    while stack:
        row = stack.pop()
        if row and isinstance(row[0], list):
            stack.extend(x for x in row if isinstance(x, list))
        if any(map(_IS_BOOL, map(type, row))):
            return True
    return False


def _fail(field: str, message: str, **details: Any) -> InvalidInput:
    return InvalidInput(f"{field}: {message}", {"field": field, **details})


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _to_array(field: str, value: Any, spec: TensorSpec) -> np.ndarray:
    """A nested JSON list -> array of the declared datatype, or a 422 explaining why not."""
    if not isinstance(value, list):
        raise _fail(
            field,
            f"expected a nested list of shape {_shape_text(spec.shape)} with {spec.datatype} values, "
            f"got {type(value).__name__}",
            expected={"shape": list(spec.shape), "datatype": spec.datatype},
        )
    try:
        raw = np.asarray(value)
    except ValueError:
        raise _fail(
            field,
            f"ragged nested list: every row must have the same length (expected shape "
            f"{_shape_text(spec.shape)})",
            expected={"shape": list(spec.shape), "datatype": spec.datatype},
        ) from None
    if raw.dtype.kind in "iuf" and spec.datatype != "BOOL" and _may_hold_bools(raw, value):
        # numpy turns true/false into 1/0 when they sit among numbers: booleans are not numbers.
        raise _fail(
            field,
            f"expected numbers for {spec.datatype}, got true/false among them",
            expected={"shape": list(spec.shape), "datatype": spec.datatype},
            received={"datatype": "boolean"},
        )
    if raw.dtype.kind in "fO" and raw.size and spec.datatype in _INTEGER_DATATYPES:
        exact = _exact_integers(value, raw)
        if exact is not None:
            return _cast_integers(field, exact, spec)
    return convert(field, raw, spec)


_INTEGER_DATATYPES = frozenset(n for n, d in NUMPY_DTYPES.items() if d.kind in "iu")


def _exact_integers(value: list[Any], raw: np.ndarray) -> np.ndarray | None:
    """JSON integers that fit no single numpy integer dtype: numpy makes small ones mixed with ones
    >= 2**63 (valid UINT64) a float64 array, losing precision, and ones beyond 64 bits an object array.
    When every element is an integer: the exact Python ints, as an object array; otherwise None (floats,
    nulls: ``convert`` refuses them). Runs only on this rare path, never for ordinary integer input."""
    if raw.dtype.kind == "f" and not np.array_equal(raw, np.trunc(raw)):
        return None  # a fraction, NaN or infinity somewhere: not integers
    exact = np.asarray(value, dtype=object)
    if exact.shape != raw.shape or not all(type(x) is int for x in exact.flat):
        return None
    return exact


def _cast_integers(field: str, raw: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Integers (numpy integers, or exact Python ints in an object array) -> ``spec.datatype``, or a 422
    naming the field when a value is outside its range."""
    target = NUMPY_DTYPES[spec.datatype]
    info = np.iinfo(target)
    lo, hi = int(raw.min()), int(raw.max())
    if lo < info.min or hi > info.max:
        raise _fail(
            field,
            f"value out of range for {spec.datatype} ({info.min}..{info.max}), got {lo}..{hi}",
            expected={"shape": list(spec.shape), "datatype": spec.datatype},
        )
    return raw.astype(target, copy=False)


def _may_hold_bools(raw: np.ndarray, value: list[Any]) -> bool:
    """Whether true/false sit among the numbers. Small arrays: the exact scan at once (cheaper than
    numpy's temporaries). Large ones: only an array holding 0 or 1 can have come from true/false, so the
    exact scan runs only then."""
    if raw.size > 64 and not ((raw == 0) | (raw == 1)).any():
        return False
    return _contains_bool(value)


def convert(field: str, raw: np.ndarray, spec: TensorSpec) -> np.ndarray:
    """Check that the values fit ``spec.datatype`` and return them as that dtype."""
    dtype_name = spec.datatype
    target = NUMPY_DTYPES.get(dtype_name)
    if target is None:
        raise _fail(field, f"datatype {dtype_name} is not supported by the JSON API")
    kind = raw.dtype.kind
    expected = {"shape": list(spec.shape), "datatype": dtype_name}
    if raw.size == 0 and raw.ndim == 1:
        raise _fail(field, "empty tensor", expected=expected, received={"shape": [0]})
    if dtype_name == "BYTES":
        if kind not in "US":
            raise _fail(field, "expected strings for BYTES", expected=expected, received={"kind": kind})
        return np.vectorize(lambda s: s.encode() if isinstance(s, str) else s, otypes=[object])(raw)
    if dtype_name == "BOOL":
        if kind != "b":
            raise _fail(field, "expected true/false values for BOOL", expected=expected,
                        received={"datatype": _received_kind(kind)})  # fmt: skip
        return raw
    if target.kind in "iu":
        if kind not in "iu":
            raise _fail(field, f"expected integers for {dtype_name}", expected=expected,
                        received={"datatype": _received_kind(kind)})  # fmt: skip
        return _cast_integers(field, raw, spec)
    # floating point
    if kind not in "iuf":
        raise _fail(field, f"expected numbers for {dtype_name}", expected=expected,
                    received={"datatype": _received_kind(kind)})  # fmt: skip
    with np.errstate(over="ignore", invalid="ignore"):
        return raw.astype(target, copy=False)


def _received_kind(kind: str) -> str:
    return {"b": "boolean", "i": "integer", "u": "integer", "f": "number", "U": "string", "S": "bytes",
            "O": "mixed or null values"}.get(kind, kind)  # fmt: skip


def check_tensor(field: str, arr: np.ndarray, spec: TensorSpec, info: ModelInfo) -> None:
    """Rank, dims, batch bound and finiteness."""
    shape = arr.shape
    if len(shape) != len(spec.shape) or any(
        want != -1 and want != got for want, got in zip(spec.shape, shape, strict=False)
    ):
        expected = {"shape": list(spec.shape), "datatype": spec.datatype}
        received = {"shape": list(shape), "datatype": spec.datatype}
        raise _fail(
            field,
            f"expected shape {_shape_text(spec.shape)}, got {_shape_text(arr.shape)}",
            expected=expected,
            received=received,
        )
    if info.batched:
        batch = shape[0]
        if batch < 1 or batch > info.max_batch_size:
            expected = {"shape": list(spec.shape), "datatype": spec.datatype}
            received = {"shape": list(shape), "datatype": spec.datatype}
            raise _fail(
                field,
                f"batch size {batch} is outside 1..{info.max_batch_size} (max_batch_size)",
                expected={**expected, "max_batch_size": info.max_batch_size},
                received=received,
            )
    if arr.dtype.kind == "f" and not info.allow_nonfinite and not np.isfinite(arr).all():
        raise _fail(
            field,
            f"NaN or infinite values (or values out of {spec.datatype} range) are not allowed",
            expected={"shape": list(spec.shape), "datatype": spec.datatype},
        )


def _check_names(info: ModelInfo, given: Sequence[str]) -> None:
    unknown = [n for n in given if n not in info.inputs]
    if unknown:
        raise _fail(
            f"inputs.{unknown[0]}",
            f"model '{info.name}' has no input '{unknown[0]}'; its inputs are {sorted(info.inputs)}",
            expected={"inputs": sorted(info.inputs)},
        )
    if len(set(given)) == len(info.inputs):  # every name is known: all present, none missing
        return
    missing = [n for n, s in info.inputs.items() if not s.optional and n not in given]
    if missing:
        spec = info.inputs[missing[0]]
        raise _fail(
            f"inputs.{missing[0]}",
            f"required input is missing (shape {_shape_text(spec.shape)}, {spec.datatype})",
            expected=spec.public(),
        )


def _check_batch_agreement(info: ModelInfo, arrays: Mapping[str, np.ndarray]) -> None:
    if not info.batched or len(arrays) < 2:
        return
    batches = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(batches.values())) > 1:
        raise _fail("inputs", f"inputs disagree on the batch size: {batches}", received=batches)


def validate_outputs(info: ModelInfo, outputs: Any) -> list[str] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list) or not all(isinstance(o, str) for o in outputs):
        raise _fail("outputs", "expected a list of output names", expected={"outputs": sorted(info.outputs)})
    unknown = [o for o in outputs if o not in info.outputs]
    if unknown:
        raise _fail(
            "outputs",
            f"model '{info.name}' has no output '{unknown[0]}'; its outputs are {sorted(info.outputs)}",
            expected={"outputs": sorted(info.outputs)},
        )
    return list(dict.fromkeys(outputs)) or None


def parameters_object(value: Any, field: str = "parameters") -> dict[str, Any]:
    """A ``parameters`` member (request, input tensor or requested output level): absent or null -> {},
    an object -> itself, anything else -> 422 naming ``field`` (e.g. ``inputs.series.parameters``)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _fail(
            field,
            f"expected an object of name -> string, number or boolean, got {_json_type(value)}",
            expected={"type": "object"},
            received={"type": _json_type(value)},
        )
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    names: dict[type, str] = {str: "string", list: "array", dict: "object"}
    return names.get(type(value), type(value).__name__)


def validate_parameters(parameters: Any, field: str = "parameters") -> dict[str, Any]:
    """Request-level parameters forwarded to Triton: an object of scalars, no reserved names."""
    parameters = parameters_object(parameters, field)
    for key, value in parameters.items():
        if key in _RESERVED_PARAMETERS or (key.startswith("triton_") and key not in _TRITON_STREAM_OPTIONS):
            raise _fail(f"{field}.{key}", "is reserved by Triton and cannot be passed as a parameter")
        if not isinstance(value, str | int | float | bool):
            raise _fail(f"{field}.{key}", f"expected a string, number or boolean, got {_json_type(value)}")
    return dict(parameters)


# Tensor parameters the gateway supports (item by item: everything else is refused, never passed on or
# ignored; ``shared_memory_*`` would make Triton read or write a shared-memory region of its own).
HTTP_INPUT_PARAMETERS = frozenset({"binary_data_size"})
HTTP_OUTPUT_PARAMETERS = frozenset({"binary_data", "classification"})
GRPC_INPUT_PARAMETERS: frozenset[str] = frozenset()
GRPC_OUTPUT_PARAMETERS = frozenset({"classification"})
_UNSUPPORTED_WHY = {
    "shared_memory_region": "the gateway does not offer shared memory: send the tensor's data",
    "shared_memory_byte_size": "the gateway does not offer shared memory: send the tensor's data",
    "shared_memory_offset": "the gateway does not offer shared memory: send the tensor's data",
}


def check_tensor_parameters(params: Mapping[str, Any], field: str, supported: frozenset[str]) -> None:
    """Refuse (422 / 400 under /v2 / INVALID_ARGUMENT) a tensor parameter the gateway does not support,
    naming it (``field`` is e.g. ``inputs.INPUT0.parameters``)."""
    for key in params:
        if key not in supported:
            why = _UNSUPPORTED_WHY.get(key, "not supported by the gateway")
            allowed = ", ".join(sorted(supported)) or "none"
            raise _fail(f"{field}.{key}", f"{why} (supported here: {allowed})",
                        expected={"parameters": sorted(supported)})  # fmt: skip


def classification(info: ModelInfo, output: str, value: Any, field: str) -> int:
    """Triton's classification extension: ``parameters.classification`` = the number of top classes of
    ``output`` to answer (as BYTES ``"value:index[:label]"``); 0 = none. A numeric output only."""
    if type(value) is not int or value < 0:
        raise _fail(
            field, f"expected a non-negative integer (the number of classes), got {_text_safe(value)!r}"
        )
    spec = info.outputs.get(output)
    if value and spec is not None and spec.datatype in ("BYTES", "BOOL"):
        raise _fail(field, f"output '{output}' is {spec.datatype}: classification needs a numeric output")
    return int(value)


def check_sequence(info: ModelInfo, sequence_id: int | str, start: bool, end: bool) -> None:
    """``sequence_id`` (and ``sequence_start``/``sequence_end``) only for a model with a sequence batcher,
    and a ``sequence_id`` Triton accepts: an integer 0..2^64-1 or a string of 1..128 characters."""
    if isinstance(sequence_id, int) and not 0 <= sequence_id < 2**64:
        raise _fail("parameters.sequence_id", f"expected an integer 0..{2**64 - 1} or a string, got "
                    f"{sequence_id}")  # fmt: skip
    if isinstance(sequence_id, str) and len(sequence_id) > 128:
        raise _fail("parameters.sequence_id", f"expected at most 128 characters, got {len(sequence_id)}")
    if (sequence_id or start or end) and "sequence_batching" not in info.config:
        given = "sequence_id" if sequence_id else "sequence_start" if start else "sequence_end"
        raise _fail(f"parameters.{given}", f"model '{info.name}' has no sequence batcher: sequence "
                    "parameters are only for sequence models")  # fmt: skip


def _text_safe(value: Any) -> Any:
    """A client's value made safe to render in an error (lone surrogates escaped)."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode()
    if isinstance(value, list):
        return [_text_safe(v) for v in value[:16]]
    return value


def value_budget(info: ModelInfo) -> int | None:
    """The most tensor values one request to this model can carry (max_batch_size x the dims of every
    input), for ``app.services.payload.check_value_budget``; None when an input has a variable dim.
    Computed once per model version (``ModelInfo.max_values``)."""
    return info.max_values


_CONTAINER_BUDGETS: dict[int, tuple[ModelInfo, ContainerBudget]] = {}


def container_budget(info: ModelInfo) -> ContainerBudget:
    """The most arrays and objects a request body to this model can hold (``payload.check_containers``):
    per input, one array per row above the innermost dimension (the batch dim counts as max_batch_size);
    below a variable dimension each level adds at most one array per value. Plus each tensor's entry,
    shape and parameters (/v2). Computed once per model version."""
    known = _CONTAINER_BUDGETS.get(id(info))
    if known is not None and known[0] is info:
        return known[1]
    fixed, per_value = 4 * (len(info.inputs) + len(info.outputs)), 0
    for spec in info.inputs.values():
        rows, bounded = 1, True
        for i, dim in enumerate(spec.shape[:-1]):
            dim = info.max_batch_size if info.batched and i == 0 else dim
            bounded = bounded and dim >= 0
            if bounded:
                rows *= dim
                fixed += rows
            else:
                per_value += 1
        fixed += 1
    budget = ContainerBudget(fixed, per_value)
    if len(_CONTAINER_BUDGETS) > 1024:
        _CONTAINER_BUDGETS.clear()
    _CONTAINER_BUDGETS[id(info)] = (info, budget)
    return budget


def validate_v1_inputs(info: ModelInfo, inputs: Any) -> dict[str, np.ndarray]:
    """``{"<input>": <nested list>}`` -> validated arrays."""
    if not isinstance(inputs, dict) or not inputs:
        raise _fail(
            "inputs",
            "expected an object mapping input names to nested lists",
            expected={"inputs": [s.public() for s in info.inputs.values()]},
        )
    _check_names(info, list(inputs))
    arrays: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        spec = info.inputs[name]
        field = f"inputs.{name}"
        arr = _to_array(field, value, spec)
        check_tensor(field, arr, spec, info)
        arrays[name] = arr
    _check_batch_agreement(info, arrays)
    return arrays


_V1_FIELDS = ("inputs", "outputs", "parameters")


def validate_v1_body(info: ModelInfo, body: Any) -> InferRequest:
    """A ``/v1`` request body, parsed (``{"inputs", "outputs"?, "parameters"?}``) -> a validated
    ``InferRequest`` for ``info``: the ``/v1`` codec (``app.frontends.rest.codec``), job bodies and
    ``/v1/ws`` frames."""
    if not isinstance(body, dict):
        raise InvalidInput("body: expected a JSON object with an 'inputs' object", {"field": "body"})
    unknown = set(body) - set(_V1_FIELDS)
    if unknown:
        field_name = sorted(unknown)[0]
        raise InvalidInput(
            f"{field_name}: unknown field; expected inputs, outputs, parameters", {"field": field_name}
        )
    return InferRequest(
        info=info,
        inputs=validate_v1_inputs(info, body.get("inputs")),
        outputs=validate_outputs(info, body.get("outputs")),
        parameters=validate_parameters(body.get("parameters")),
    )


def validate_v2_request(
    info: ModelInfo,
    inputs: Any,
    binary: Mapping[str, bytes | memoryview] | None,
    outputs: list[str] | None,
    params: dict[str, Any],
    options: CallOptions,
    classification: dict[str, int],
) -> InferRequest:
    """The validated request of a KServe v2 body (HTTP JSON and binary, gRPC): its tensors (``binary``: the
    raw data by input), its model parameters and the call options the codec read."""
    return InferRequest(
        info=info,
        inputs=validate_v2_inputs(info, inputs, binary),
        outputs=outputs,
        parameters=validate_parameters(params),
        options=options,
        classification=classification,
    )


def validate_v2_inputs(
    info: ModelInfo, inputs: Any, binary: Mapping[str, bytes | memoryview] | None = None
) -> dict[str, np.ndarray]:
    """KServe v2 ``inputs: [{name, shape, datatype, data}]``; ``binary`` holds binary-extension data."""
    if not isinstance(inputs, list) or not inputs:
        raise _fail("inputs", "expected a non-empty list of {name, shape, datatype, data} tensors")
    names: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(inputs):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise _fail(f"inputs[{i}]", "expected an object with name, shape, datatype and data")
        names.append(tensor["name"])
    _check_names(info, names)
    if len(set(names)) != len(names):  # Triton refuses a request naming an input twice
        twice = next(n for i, n in enumerate(names) if n in names[:i])
        raise _fail(f"inputs.{twice}", "appears more than once; give each input once")
    for tensor in inputs:
        name = tensor["name"]
        spec = info.inputs[name]
        field = f"inputs.{name}"
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _fail(f"{field}.shape", "expected a list of non-negative integers",
                        received={"shape": _text_safe(shape)})  # fmt: skip
        datatype = tensor.get("datatype")
        if datatype != spec.datatype:
            raise _fail(
                f"{field}.datatype",
                f"expected {spec.datatype}, got {datatype}",
                expected=spec.public(),
                received={"datatype": datatype},
            )
        count = math.prod(shape)
        if binary is not None and name in binary:
            arr = _from_binary(field, binary[name], spec, shape, count)
        else:
            data = tensor.get("data")
            if data is None:
                raise _fail(f"{field}.data", "missing tensor data")
            flat = _to_array(field, data if isinstance(data, list) else [data], spec).reshape(-1)
            if flat.size != count:
                raise _fail(
                    f"{field}.data",
                    f"has {flat.size} values but shape {_shape_text(shape)} needs {count}",
                    received={"values": int(flat.size), "shape": shape},
                )
            arr = flat.reshape(shape)
        check_tensor(field, arr, spec, info)
        arrays[name] = arr
    _check_batch_agreement(info, arrays)
    return arrays


def _from_binary(
    field: str, data: bytes | memoryview, spec: TensorSpec, shape: list[int], count: int
) -> np.ndarray:
    if spec.datatype == "BYTES":
        try:
            arr = deserialize_bytes_tensor(data)
        except Exception:
            raise _fail(field, "malformed BYTES binary data (4-byte length prefixes expected)") from None
        if arr.size != count:
            raise _fail(field, f"has {arr.size} elements but shape {_shape_text(shape)} needs {count}")
        return arr.reshape(shape)
    dtype = NUMPY_DTYPES[spec.datatype]
    if len(data) != count * dtype.itemsize:
        raise _fail(
            field,
            f"binary data is {len(data)} bytes; shape {_shape_text(shape)} of {spec.datatype} needs "
            f"{count * dtype.itemsize}",
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)
