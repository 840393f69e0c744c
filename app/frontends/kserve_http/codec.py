"""KServe v2 / Triton HTTP inference: JSON tensors and the binary-tensor extension
(``app.frontends.kserve_http.binary``).

``decode(info, raw, header_length)`` -> ``V2Request`` (the ``InferRequest`` plus what the answer must
echo: the request ``id`` and which outputs go binary); ``encode(response, v2)`` -> ``Reply``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from app.codecs import encoding
from app.codecs.common import JSON, OCTET_STREAM, Reply, call_options, tensor_json_values
from app.domain import InferRequest, InferResponse, ModelInfo, jsonable
from app.errors import BadRequest, InvalidInput
from app.frontends.kserve_http import binary
from app.services.payload import parse_json
from app.services.validation import (
    HTTP_INPUT_PARAMETERS,
    HTTP_OUTPUT_PARAMETERS,
    NUMPY_DTYPES,
    check_tensor_parameters,
    classification,
    container_budget,
    parameters_object,
    validate_outputs,
    validate_v2_inputs,
    validate_v2_request,
    value_budget,
)

HEADER_LENGTH = binary.HEADER_LENGTH


@dataclass(slots=True)
class V2Request:
    request: InferRequest
    id: str | None
    binary_outputs: set[str]


def _safe_name(name: Any) -> str:
    """A client's tensor name as it may appear in an error (lone surrogates escaped)."""
    return str(name).encode("utf-8", "backslashreplace").decode()


def _header_length(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest("Inference-Header-Content-Length must be an integer") from None


def decode_encoded(
    info: ModelInfo, raw: bytes, content_encoding: str | None, limit: int, header_length: str | None
) -> V2Request:
    """``decode`` of a body sent with ``Content-Encoding`` (inflated first, up to ``limit`` bytes)."""
    return decode(info, encoding.decode_body(raw, content_encoding, limit), header_length)


def decode(info: ModelInfo, raw: bytes, header_length: str | None) -> V2Request:
    length = _header_length(header_length)
    if length == 0:
        return _decode_raw(info, raw)
    try:
        head, tail = binary.split(raw, length)
    except binary.FramingError as exc:
        raise BadRequest(str(exc), {"field": exc.field}) from None
    body = parse_json(head, max_values=value_budget(info), containers=container_budget(info))
    if not isinstance(body, dict):
        raise InvalidInput("body: expected a JSON object with an 'inputs' list", {"field": "body"})
    inputs = body.get("inputs")
    for tensor in inputs if isinstance(inputs, list) else []:
        if isinstance(tensor, dict) and tensor.get("parameters") is not None:
            field = f"inputs.{_safe_name(tensor.get('name'))}.parameters"
            check_tensor_parameters(
                parameters_object(tensor["parameters"], field), field, HTTP_INPUT_PARAMETERS
            )
    try:
        parts = binary.binary_parts(inputs if isinstance(inputs, list) else [], tail, "inputs")
    except binary.FramingError as exc:
        raise InvalidInput(str(exc), {"field": exc.field}) from None

    params = body.get("parameters")
    if params is not None and not isinstance(params, dict):
        raise InvalidInput("parameters: expected an object", {"field": "parameters"})
    params = dict(params or {})
    all_binary = params.pop("binary_data_output", False)
    if not isinstance(all_binary, bool):
        raise InvalidInput("parameters.binary_data_output: expected true or false",
                           {"field": "parameters.binary_data_output"})  # fmt: skip
    options = call_options(params, info)
    requested = body.get("outputs")
    names: list[str] | None = None
    binary_outputs: set[str] = set()
    top: dict[str, int] = {}
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) and "name" in o for o in requested):
            raise InvalidInput(
                "outputs: expected a list of {name, parameters?} objects", {"field": "outputs"}
            )
        names = validate_outputs(info, [o["name"] for o in requested])
        for o in requested:
            field = f"outputs.{_safe_name(o['name'])}.parameters"
            o_params = parameters_object(o.get("parameters"), field)
            check_tensor_parameters(o_params, field, HTTP_OUTPUT_PARAMETERS)
            if "classification" in o_params:
                count = classification(info, o["name"], o_params["classification"], f"{field}.classification")
                if count:
                    top[o["name"]] = count
            as_binary = o_params.get("binary_data", all_binary)
            if not isinstance(as_binary, bool):
                raise InvalidInput(f"{field}.binary_data: expected true or false",
                                   {"field": f"{field}.binary_data"})  # fmt: skip
            if as_binary:
                binary_outputs.add(o["name"])
    elif all_binary:
        binary_outputs = set(info.outputs)
    request = validate_v2_request(info, inputs, parts, names, params, options, top)
    request_id = body.get("id")
    return V2Request(request, str(request_id) if request_id is not None else None, binary_outputs)


_RAW = "Inference-Header-Content-Length"


def _decode_raw(info: ModelInfo, raw: bytes) -> V2Request:
    """A raw binary request (``Inference-Header-Content-Length: 0``): the body is the bytes of the model's
    only input; its shape is deduced from the byte size (batch 1, at most one variable dimension).
    Every output comes back binary, as Triton answers it."""
    if len(info.inputs) != 1:
        raise InvalidInput(
            f"{_RAW}: 0 (a raw binary request) needs a model with exactly one input; "
            f"'{info.name}' has {len(info.inputs)}: send a JSON header instead", {"field": _RAW}
        )  # fmt: skip
    spec = next(iter(info.inputs.values()))
    dtype = NUMPY_DTYPES.get(spec.datatype)
    if spec.datatype == "BYTES" or dtype is None:
        raise InvalidInput(f"{_RAW}: 0: input '{spec.name}' is {spec.datatype}; raw requests need a "
                           "fixed-size datatype", {"field": _RAW})  # fmt: skip
    if not raw or len(raw) % dtype.itemsize:
        raise InvalidInput(f"body: {len(raw)} bytes is not a whole number of {spec.datatype} values",
                           {"field": "body"})  # fmt: skip
    dims = list(spec.shape)
    if info.batched:
        dims[0] = 1
    variable = [i for i, d in enumerate(dims) if d < 0]
    fixed = math.prod(d for d in dims if d >= 0)
    count = len(raw) // dtype.itemsize
    if len(variable) > 1:
        raise InvalidInput(f"{_RAW}: 0: the shape {spec.shape} of input '{spec.name}' cannot be deduced from "
                           "the byte size; send a JSON header instead", {"field": _RAW})  # fmt: skip
    if variable:
        dims[variable[0]] = count // fixed if fixed and count % fixed == 0 else -1
    tensor = {"name": spec.name, "datatype": spec.datatype, "shape": dims}
    request = InferRequest(info=info, inputs=validate_v2_inputs(info, [tensor], {spec.name: raw}))
    return V2Request(request, None, set(info.outputs))


def encode(response: InferResponse, req: V2Request) -> Reply:
    return encode_answer(response, req.id, req.binary_outputs)


# gzip level 1 costs ~14 ns a byte of JSON (~10 bytes a value: ~6x writing the value) and ~36 ns a byte of a
# binary tensor (~1.5 values' worth), measured with a 7.4 MB answer (~100 ms either way).
_GZIP_JSON_VALUE_COST, _GZIP_BINARY_BYTE_COST = 6, 1.5


def encode_cost(response: InferResponse, binary_outputs: set[str], accept_encoding: str | None) -> int:
    """The work of ``encode_answer``, in JSON values (``Offload.encode`` decides on it); ~0.3 µs."""
    values = blobs = 0
    for name, arr in response.result.outputs.items():
        if name in binary_outputs:
            blobs += arr.nbytes
        else:
            values += tensor_json_values(arr)
    if not accept_encoding or encoding.accepted(accept_encoding) is None:
        return values
    return int(values * (1 + _GZIP_JSON_VALUE_COST) + blobs * _GZIP_BINARY_BYTE_COST)


def encode_answer(
    response: InferResponse,
    request_id: str | None,
    binary_outputs: set[str],
    accept_encoding: str | None = None,
) -> Reply:
    """The answer (compressed when ``Accept-Encoding`` asks for it): what ``encode`` needs of the request, so
    that the answer can be written in a child process without shipping the request's inputs there."""
    outputs = []
    blobs: list[binary.Blob] = []
    result = response.result
    for name, arr in result.outputs.items():
        datatype = result.datatypes[name]
        if name in binary_outputs:
            outputs.append(binary.binary_item(name, datatype, arr, blobs))
        else:
            outputs.append({"name": name, "datatype": datatype, "shape": arr.shape,
                            "data": jsonable(arr.reshape(-1))})  # fmt: skip
    header: dict[str, Any] = {"model_name": response.model, "model_version": result.model_version,
                              "outputs": outputs}  # fmt: skip
    if request_id is not None:
        header["id"] = request_id
    body, head_length = binary.pack(header, blobs)
    x_cache = (b"x-cache", response.cache.encode())
    if head_length is None:
        reply = Reply(200, body, JSON, (x_cache,))
    else:
        reply = Reply(200, body, OCTET_STREAM, (x_cache, (binary.HEADER_LENGTH_BYTES, b"%d" % head_length)))
    return encoding.encode_reply(reply, accept_encoding) if accept_encoding else reply
