"""The gateway's own JSON API (``/v1``, the WebSocket API and job bodies).

Request: ``{"inputs": {name: nested list}, "outputs"?: [names], "parameters"?: {...}}``.
Answer: ``{"model", "model_version", "outputs": {name: nested list}}`` with ``X-Cache``.
"""

from __future__ import annotations

from typing import Any

from app.codecs.common import Reply, dumps
from app.domain import InferRequest, InferResponse, ModelInfo
from app.errors import InvalidInput
from app.services.payload import parse_json
from app.services.validation import (
    container_budget,
    validate_outputs,
    validate_parameters,
    validate_v1_inputs,
    value_budget,
)

_FIELDS = ("inputs", "outputs", "parameters")
X_CACHE = {outcome: ((b"x-cache", outcome.encode()),) for outcome in ("HIT", "MISS", "BYPASS")}


def decode(info: ModelInfo, raw: bytes) -> InferRequest:
    """A /v1 request body (bytes) -> a validated ``InferRequest`` for ``info``."""
    body = parse_json(raw, max_values=value_budget(info), containers=container_budget(info))
    return decode_body(info, body)


def decode_body(info: ModelInfo, body: Any) -> InferRequest:
    """The same for a body already parsed (job records, WebSocket frames)."""
    if not isinstance(body, dict):
        raise InvalidInput("body: expected a JSON object with an 'inputs' object", {"field": "body"})
    unknown = set(body) - set(_FIELDS)
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


def result(response: InferResponse) -> dict[str, Any]:
    """The answer as a JSON-able object (also embedded in job results and WebSocket frames)."""
    return response.public()


def encode(response: InferResponse) -> Reply:
    return Reply(200, dumps(result(response)), headers=X_CACHE[response.cache])
