"""The gateway's own JSON API (``/v1``, the WebSocket API and job bodies).

Request: ``{"inputs": {name: nested list}, "outputs"?: [names], "parameters"?: {...}}``.
Answer: ``{"model", "model_version", "outputs": {name: nested list}}`` with ``X-Cache``.
"""

from __future__ import annotations

from app.codecs.common import Reply, dumps
from app.domain import InferRequest, InferResponse, ModelInfo
from app.services.payload import parse_json
from app.services.validation import container_budget, validate_v1_body, value_budget

X_CACHE = {outcome: ((b"x-cache", outcome.encode()),) for outcome in ("HIT", "MISS", "BYPASS")}


def decode(info: ModelInfo, raw: bytes) -> InferRequest:
    """A /v1 request body (bytes) -> a validated ``InferRequest`` for ``info``."""
    body = parse_json(raw, max_values=value_budget(info), containers=container_budget(info))
    return validate_v1_body(info, body)


def encode(response: InferResponse) -> Reply:
    return Reply(200, dumps(response.public()), headers=X_CACHE[response.cache])
