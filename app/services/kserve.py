"""KServe v2 inference protocol: the JSON tensor format and the binary-tensor extension.

Request: a JSON header, optionally followed by raw tensor bytes; the header's length is given in the
``Inference-Header-Content-Length`` HTTP header and each binary input says its size in
``parameters.binary_data_size``. Response: the same framing for outputs asked for as binary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from app.clients.tensors import tensor_bytes
from app.errors import BadRequest, InvalidInput
from app.services.inference import InferRequest, InferResponse, jsonable
from app.services.payload import parse_json
from app.services.registry import ModelInfo
from app.services.validation import validate_outputs, validate_parameters, validate_v2_inputs

HEADER_LENGTH = "inference-header-content-length"


@dataclass(slots=True)
class V2Request:
    request: InferRequest
    id: str | None
    binary_outputs: set[str]


def split_body(raw: bytes, header_length: str | None) -> tuple[Any, bytes]:
    if header_length is None:
        return parse_json(raw), b""
    try:
        n = int(header_length)
    except ValueError:
        raise BadRequest("Inference-Header-Content-Length must be an integer") from None
    if n < 0 or n > len(raw):
        raise BadRequest(f"Inference-Header-Content-Length {n} is outside the body ({len(raw)} bytes)")
    return parse_json(raw[:n]), raw[n:]


def parse_v2(info: ModelInfo, raw: bytes, header_length: str | None) -> V2Request:
    body, tail = split_body(raw, header_length)
    if not isinstance(body, dict):
        raise InvalidInput("body: expected a JSON object with an 'inputs' list", {"field": "body"})
    inputs = body.get("inputs")
    binary: dict[str, bytes] = {}
    offset = 0
    for tensor in inputs if isinstance(inputs, list) else []:
        size = (tensor.get("parameters") or {}).get("binary_data_size") if isinstance(tensor, dict) else None
        if size is None:
            continue
        if not isinstance(size, int) or size < 0 or offset + size > len(tail):
            raise InvalidInput(
                f"inputs.{tensor.get('name')}.parameters.binary_data_size: {size} does not fit the "
                f"{len(tail)} bytes of binary data",
                {"field": f"inputs.{tensor.get('name')}.parameters.binary_data_size"},
            )
        binary[str(tensor.get("name"))] = tail[offset : offset + size]
        offset += size
    if offset != len(tail):
        raise InvalidInput(f"body: {len(tail) - offset} bytes of binary data are not claimed by any input")

    params = dict(body.get("parameters") or {})
    all_binary = bool(params.pop("binary_data_output", False))
    requested = body.get("outputs")
    names: list[str] | None = None
    binary_outputs: set[str] = set()
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) and "name" in o for o in requested):
            raise InvalidInput(
                "outputs: expected a list of {name, parameters?} objects", {"field": "outputs"}
            )
        names = validate_outputs(info, [o["name"] for o in requested])
        binary_outputs = {
            o["name"] for o in requested if (o.get("parameters") or {}).get("binary_data", all_binary)
        }
    if all_binary:
        binary_outputs |= set(names or info.outputs)
    request = InferRequest(
        info=info,
        inputs=validate_v2_inputs(info, inputs, binary),
        outputs=names,
        parameters=validate_parameters(params),
    )
    request_id = body.get("id")
    return V2Request(request, str(request_id) if request_id is not None else None, binary_outputs)


def render_v2(response: InferResponse, req: V2Request) -> tuple[bytes, int | None]:
    """Returns (body, json_header_length or None when there is no binary part)."""
    outputs = []
    blobs: list[bytes] = []
    for name, arr in response.result.outputs.items():
        item: dict[str, Any] = {
            "name": name,
            "datatype": response.result.datatypes[name],
            "shape": list(arr.shape),
        }
        if name in req.binary_outputs:
            blob = tensor_bytes(arr)
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = jsonable(arr.reshape(-1))
        outputs.append(item)
    header: dict[str, Any] = {
        "model_name": response.model,
        "model_version": response.result.model_version,
        "outputs": outputs,
    }
    if req.id is not None:
        header["id"] = req.id
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return head, None
    return b"".join([head, *blobs]), len(head)
