"""``POST /v1/models/{model}[/versions/{version}]/infer``: JSON in, JSON out, ``X-Cache`` header."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.deps import InferenceDep
from app.request_context import current_request_id
from app.routers.common import ORJSONResponse, read_json
from app.services.inference import InferenceService, cache_directives

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


async def serve_v1(service: InferenceService, request: Request, model: str, version: str | None) -> Response:
    """The /v1 handler; also called directly by ``app.fastpath``."""
    body = await read_json(request)
    req = await service.prepare_v1(model, version, body)
    req.cache_read, req.cache_write = cache_directives(request.headers.get("cache-control"))
    response = await service.infer(req, current_request_id() or "")
    return ORJSONResponse(response.to_v1(), headers={"X-Cache": response.cache})


@router.post("/{model}/infer", openapi_extra=_BODY_DOC, response_class=ORJSONResponse)
async def infer(model: str, request: Request, service: InferenceDep) -> Response:
    return await serve_v1(service, request, model, None)


@router.post("/{model}/versions/{version}/infer", openapi_extra=_BODY_DOC, response_class=ORJSONResponse)
async def infer_version(model: str, version: str, request: Request, service: InferenceDep) -> Response:
    return await serve_v1(service, request, model, version)
