"""``POST /v1/models/{model}[/versions/{version}]/infer``: JSON in, JSON out, ``X-Cache`` header.

Served by the request pipeline's infer router (``app.frontends.http.pipeline.InferRouter``), not by a
FastAPI route:
``serve_v1`` is the handler, ``document_infer_routes`` puts the four infer operations (v1 and v2) in the
OpenAPI document."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.exceptions import HTTPException

from app.codecs.common import Reply, json_values
from app.frontends.http.common import Headers
from app.frontends.http.schemas import ERROR_TEXT, INFER_BODY_PROPERTIES, InferResult, body_doc, error_ref
from app.frontends.rest import codec as v1
from app.request_context import RequestContext
from app.services.inference import InferenceService
from app.services.offload import INLINE, Offload

__all__ = ["Reply", "document_infer_routes", "router", "serve_v1"]


async def serve_v1(
    service: InferenceService, model: str, version: str | None, body: bytes, headers: Headers,
    ctx: RequestContext, offload: Offload = INLINE,
) -> Reply:  # fmt: skip
    """Large bodies are decoded, and large answers written, in ``offload``'s child processes."""
    info = await service.resolve(model, version)
    req = await offload.decode(len(body), v1.decode, info, body)
    response = await service.infer(req, ctx)
    values = json_values(response.result.outputs)
    if not offload.encodes_in_child(values):
        return v1.encode(response)
    return await offload.encode(values, v1.encode, response)


# Only POST reaches the pipeline's infer router; any other method on an infer path is 405 (as Triton
# answers), not the 404 of a path FastAPI does not know.
router = APIRouter()


async def _post_only() -> None:
    raise HTTPException(405, "infer takes POST", headers={"Allow": "POST"})


for _path in ("/v1/models/{model}/infer", "/v1/models/{model}/versions/{version}/infer",
              "/v2/models/{model}/infer", "/v2/models/{model}/versions/{version}/infer"):  # fmt: skip
    router.add_api_route(
        _path, _post_only, methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False
    )


# --- OpenAPI -------------------------------------------------------------------------------------------
_V1_ANSWER = InferResult.model_json_schema()
_V2_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string"},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
_V2_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": _V2_TENSOR},
        "outputs": {"type": "array", "items": {"type": "object"}},
    },
}
_V2_ANSWER = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": _V2_TENSOR},
    },
}
_PATH_PARAMS = {
    "model": {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}},
    "version": {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}},
}


def _operation(api: str, versioned: bool) -> dict[str, Any]:
    params = [_PATH_PARAMS["model"], *([_PATH_PARAMS["version"]] if versioned else [])]
    errors = {**ERROR_TEXT, 404: "model or version not found"}
    codes = [400, 404, 413, 501, 502, 503, 504]
    errors[501] = "a decoupled model: served over gRPC ModelStreamInfer only"
    if api == "v1":
        codes.append(422)
        request = body_doc(INFER_BODY_PROPERTIES, {"inputs": {"series": [[[0.0]] * 20]}})
        answer: dict[str, Any] = {"application/json": {"schema": _V1_ANSWER}}
        tag, summary = "inference", "Infer" + (" (version)" if versioned else "")
    else:
        request = {"requestBody": {"required": True, "content": {
            "application/json": {"schema": _V2_REQUEST},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        }}}  # fmt: skip
        answer = {"application/json": {"schema": _V2_ANSWER},
                  "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}  # fmt: skip
        tag, summary = "kserve-v2", "KServe v2 infer" + (" (version)" if versioned else "")
        errors[400] = "bad request or invalid input (names the field; KServe v2 has no 422)"
    responses: dict[str, Any] = {"200": {"description": "the model's answer", "content": answer}}
    error = {"application/json": {"schema": error_ref(kserve=api == "v2")}}
    responses.update({str(code): {"description": errors[code], "content": error} for code in sorted(codes)})
    op_id = f"infer_{api}" + ("_version" if versioned else "")
    return {"post": {"tags": [tag], "summary": summary, "operationId": op_id, "parameters": params,
                     **request, "responses": responses}}  # fmt: skip


def document_infer_routes(app: FastAPI) -> None:
    """Add the infer operations (served by the pipeline, not FastAPI) to ``app.openapi()``."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for api in ("v1", "v2"):
                for versioned in (False, True):
                    version = "/versions/{version}" if versioned else ""
                    path = f"/{api}/models/{{model}}{version}/infer"
                    schema["paths"][path] = _operation(api, versioned)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]
