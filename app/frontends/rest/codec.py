"""The gateway's own JSON API (``/v1``, the WebSocket API and job bodies).

Request: ``{"inputs": {name: nested list}, "outputs"?: [names], "parameters"?: {...}}``.
Answer: ``{"model", "model_version", "outputs": {name: nested list}}`` with ``X-Cache``.
Stream (``/v1/models/{model}/stream``): one server-sent event per response, the answer plus ``final`` (the
request's last response) and ``seq`` (1, 2, ...); an error is an ``error`` event holding the error JSON.
"""

from __future__ import annotations

from sse_starlette import ServerSentEvent

from app.codecs.common import Reply, dumps
from app.domain import InferRequest, InferResponse, ModelInfo
from app.errors import GatewayError, error_body
from app.frontends.http.sse import event
from app.services.payload import parse_json
from app.services.validation import container_budget, validate_v1_body, value_budget

X_CACHE = {outcome: ((b"x-cache", outcome.encode()),) for outcome in ("HIT", "MISS", "BYPASS")}


def decode(info: ModelInfo, raw: bytes) -> InferRequest:
    """A /v1 request body (bytes) -> a validated ``InferRequest`` for ``info``."""
    body = parse_json(raw, max_values=value_budget(info), containers=container_budget(info))
    return validate_v1_body(info, body)


def encode(response: InferResponse) -> Reply:
    return Reply(200, dumps(response.public()), headers=X_CACHE[response.cache])


def stream_event(response: InferResponse, seq: int) -> ServerSentEvent:
    """One response of a stream: the answer, ``final`` and ``seq``. Triton's empty final response of a
    decoupled model is an event too (``outputs`` empty, ``final`` true): the client learns the end."""
    return event(dumps({**response.public(), "final": response.result.final, "seq": seq}).decode())


def error_event(exc: GatewayError) -> ServerSentEvent:
    """``event: error`` with the one error shape, ``{"error": {"code", "message", "details"}}``."""
    return event(error_body(exc.code, exc.message, exc.details).decode(), "error")
