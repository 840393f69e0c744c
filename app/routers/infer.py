"""``POST /v1/models/{model}[/versions/{version}]/infer``: JSON in, JSON out, ``X-Cache`` header."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.deps import InferenceDep
from app.request_context import current_request_id
from app.routers.common import ORJSONResponse, Reply, dumps
from app.services.inference import InferenceService, cache_directives
from app.services.payload import parse_json

router = APIRouter(prefix="/v1/models", tags=["inference"])

INFER_BODY_PROPERTIES: dict[str, Any] = {
    "inputs": {"type": "object", "additionalProperties": {"type": "array"}},
    "outputs": {"type": "array", "items": {"type": "string"}},
    "parameters": {"type": "object"},
}


def body_doc(properties: dict[str, Any], example: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI ``requestBody`` for routes that read their JSON body themselves (no pydantic model)."""
    schema = {"type": "object", "required": ["inputs"], "properties": properties}
    content = {"application/json": {"schema": schema, "example": example}}
    return {"requestBody": {"required": True, "content": content}}


_BODY_DOC = body_doc(INFER_BODY_PROPERTIES, {"inputs": {"series": [[[0.0]] * 20]}})


_X_CACHE = {outcome: ((b"x-cache", outcome.encode()),) for outcome in ("HIT", "MISS", "BYPASS")}


async def serve_v1(
    service: InferenceService, body: bytes, cache_control: str | None, model: str, version: str | None
) -> Reply:
    """The /v1 handler, shared by the routes below and ``app.hotpath``."""
    req = await service.prepare_v1(model, version, parse_json(body))
    req.cache_read, req.cache_write = cache_directives(cache_control)
    response = await service.infer(req, current_request_id() or "")
    return Reply(200, dumps(response.to_v1()), headers=_X_CACHE[response.cache])


@router.post("/{model}/infer", openapi_extra=_BODY_DOC, response_class=ORJSONResponse)
async def infer(model: str, request: Request, service: InferenceDep) -> Response:
    reply = await serve_v1(service, await request.body(), request.headers.get("cache-control"), model, None)
    return reply.response()


@router.post("/{model}/versions/{version}/infer", openapi_extra=_BODY_DOC, response_class=ORJSONResponse)
async def infer_version(model: str, version: str, request: Request, service: InferenceDep) -> Response:
    body = await request.body()
    return (await serve_v1(service, body, request.headers.get("cache-control"), model, version)).response()
