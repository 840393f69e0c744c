"""Triton's generate extension (``POST /v2/models/{model}[/versions/{version}]/generate`` and
``/generate_stream``), with Triton 2.51's request and response shapes, so that a client written for Triton's
endpoint works unchanged (docs/kserve.md, "Generate").

Request: one flat JSON object. A key naming a model input is that input: a value or a 1-D list of values,
shaped as Triton shapes it (``tensor_shape``); ``parameters`` is an object whose keys are read the same way;
``id`` is echoed in the answer; any other key is a request parameter (a string, integer, boolean or number),
``priority``/``timeout`` and the sequence controls being Triton's own (``call_options``).

Answer (``/generate``: the JSON object; ``/generate_stream``: one ``data:`` event each): ``model_name``,
``model_version``, ``id`` when the request had one, and every output by name, a value when it holds one
element, else the flat list of its values (``answer``). Triton's empty final response of a decoupled model
is no event. Values are written as Triton writes them: an FP32 value is the float64 it widens to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sse_starlette import ServerSentEvent

from app.codecs.common import Reply, call_options, dumps
from app.domain import InferRequest, InferResponse, ModelInfo
from app.errors import BadRequest, GatewayError, InvalidInput, UpstreamError, UpstreamRejected, error_body
from app.frontends.http.sse import event
from app.services.payload import parse_json
from app.services.validation import container_budget, validate_parameters, validate_v2_inputs, value_budget

# What Triton 2.51 answers /generate when the model did not answer exactly once (with status 200).
NOT_ONE_RESPONSE = (
    "generate expects model to produce exactly 1 response, use generate stream for model that generates "
    "various number of responses"
)
PARAMETERS = "parameters"
_REJECTED = "Triton rejected the request: "  # app.errors.upstream_error's prefix


class ModelRefused(BadRequest, code="triton_rejected_input"):
    """The model's own error (it raised, or Triton refused the request), as Triton's generate answers it."""


def as_triton(exc: GatewayError) -> GatewayError:
    """An error the model itself reported, as Triton's generate reports it: 400 with Triton's message (a
    decoupled model's error comes in the gRPC stream without a status, which the other doors answer 502;
    Triton's HTTP front end maps it, ``TRITONSERVER_ERROR_UNKNOWN``, to 400). Other errors are unchanged."""
    if isinstance(exc, UpstreamRejected) or (
        type(exc) is UpstreamError and exc.details.get("grpc_status") == "UNKNOWN"
    ):
        return ModelRefused(exc.message.removeprefix(_REJECTED), exc.details)
    return exc


async def triton_errors(responses: AsyncIterator[InferResponse]) -> AsyncIterator[InferResponse]:
    """``responses`` with a model's error raised as Triton's generate reports it (``as_triton``)."""
    try:
        async for response in responses:
            yield response
    except GatewayError as exc:
        raise as_triton(exc) from None


@dataclass(slots=True)
class GenerateRequest:
    request: InferRequest
    id: str | None


def tensor_shape(name: str, dims: tuple[int, ...], count: int) -> list[int]:
    """Triton's shape for ``count`` values of an input whose metadata shape is ``dims`` (``-1``: variable,
    the batch dimension included): the fixed dimensions take their part of the count, the innermost
    variable dimension the rest, every other variable dimension 1."""
    shape = list(dims)
    left = count
    for d in reversed(shape):
        if d != -1:
            if d == 0 or left % d:
                raise _shapeless(name)
            left //= d
    for i in range(len(shape) - 1, -1, -1):
        if shape[i] == -1:
            shape[i], left = left, 1
    if left != 1:
        raise _shapeless(name)
    return shape


def _shapeless(name: str) -> InvalidInput:
    return InvalidInput(f"The schema can not convert input '{name}' to tensor with proper shape",
                        {"field": name})  # fmt: skip


def decode(info: ModelInfo, raw: bytes) -> GenerateRequest:
    """A generate body (bytes) -> the validated ``InferRequest`` for ``info`` and the ``id`` to echo."""
    body = parse_json(raw, max_values=value_budget(info), containers=container_budget(info))
    if not isinstance(body, dict):
        raise InvalidInput("body: expected a JSON object of inputs and parameters", {"field": "body"})
    tensors: list[dict[str, Any]] = []
    params: dict[str, Any] = {}
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("id: expected a string", {"field": "id"})
    for key, value in body.items():
        if key == "id" and key not in info.inputs:
            continue
        if key == PARAMETERS and key not in info.inputs:
            if not isinstance(value, dict):
                raise InvalidInput("Expected JSON object for keyword: 'parameters'", {"field": PARAMETERS})
            for name, nested in value.items():
                _take(info, name, nested, f"{PARAMETERS}.{name}", tensors, params)
            continue
        _take(info, key, value, key, tensors, params)
    given = {t["name"] for t in tensors}
    missing = [n for n, spec in info.inputs.items() if not spec.optional and n not in given]
    if missing:
        spec = info.inputs[missing[0]]
        raise InvalidInput(
            f"{missing[0]}: required input is missing ({spec.datatype}, shape {list(spec.shape)}); model "
            f"'{info.name}' takes {sorted(info.inputs)}", {"field": missing[0], "expected": spec.public()},
        )  # fmt: skip
    options = call_options(params, info)
    request = InferRequest(
        info=info, inputs=validate_v2_inputs(info, tensors), parameters=validate_parameters(params),
        options=options,
    )  # fmt: skip
    return GenerateRequest(request, request_id)


def _take(
    info: ModelInfo, name: str, value: Any, field: str, tensors: list[dict[str, Any]], params: dict[str, Any]
) -> None:
    spec = info.inputs.get(name)
    if spec is None:  # a request parameter, of the types Triton takes
        if value is None or isinstance(value, dict | list):
            raise InvalidInput(f"parameter '{name}' has invalid type. It should be either 'int', 'bool', or "
                               "'string'.", {"field": field})  # fmt: skip
        params[name] = value
        return
    if any(t["name"] == name for t in tensors):
        raise InvalidInput(f"{field}: input '{name}' is given twice", {"field": field})
    data = value if isinstance(value, list) else [value]
    if any(isinstance(v, list | dict) for v in data):
        raise InvalidInput(f"{field}: expected a value or a list of values (a generate input is flat)",
                           {"field": field})  # fmt: skip
    shape = tensor_shape(name, spec.shape, len(data))
    tensors.append({"name": name, "datatype": spec.datatype, "shape": shape, "data": data})


def answer(response: InferResponse, request_id: str | None) -> dict[str, Any]:
    """One response as Triton's generate writes it (keys in Triton's order: its ``std::map``'s)."""
    result = response.result
    out: dict[str, Any] = {"model_name": response.model, "model_version": result.model_version}
    if request_id:
        out["id"] = request_id
    for name, arr in result.outputs.items():
        if name not in out:
            values = _values(arr)
            out[name] = values[0] if len(values) == 1 else values
    return dict(sorted(out.items()))


def _values(arr: np.ndarray) -> list[Any]:
    flat = arr.reshape(-1)
    if flat.dtype == np.object_:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in flat.tolist()]
    return list(flat.tolist())  # FP32 widened to float64, as Triton writes it (not float32's shortest form)


def is_empty_final(response: InferResponse) -> bool:
    """Triton's last response of a decoupled model, carrying only the final flag: no answer of its own."""
    return response.result.final and not response.result.outputs


def reply(response: InferResponse, request_id: str | None) -> Reply:
    return Reply(200, dumps(answer(response, request_id)), headers=((b"x-cache", response.cache.encode()),))


def not_one_response(cache: str) -> Reply:
    """Triton's answer to /generate when the model answered more than once (or not at all): 200, an
    error."""
    body = error_body("not_one_response", NOT_ONE_RESPONSE, {"use": "generate_stream"}, kserve=True)
    return Reply(200, body, headers=((b"x-cache", cache.encode()),))


def event_renderer(request_id: str | None) -> Callable[[InferResponse, int], ServerSentEvent | None]:
    def render(response: InferResponse, _: int) -> ServerSentEvent | None:
        if is_empty_final(response):
            return None
        return event(dumps(answer(response, request_id)).decode())

    return render


def error_event(exc: GatewayError) -> ServerSentEvent:
    """``data: {"error": message, ...}``, as Triton writes an error event (with the gateway's ``code`` and
    ``details`` beside it, as on every /v2 error)."""
    return event(error_body(exc.code, exc.message, exc.details, kserve=True).decode())
