"""Response shapes for the OpenAPI document (clients generate code from it). The handlers return
``ORJSONResponse`` directly, so these models document the answers and are never used to validate or
serialize them at run time (no cost on the request path)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

# The error schemas are every HTTP door's: app.frontends.http.web; the rest are the doors'.
from app.frontends.http.web import ERROR_TEXT as ERROR_TEXT
from app.frontends.http.web import REF_TEMPLATE, Error, ErrorInfo, KServeError, error_ref, errors


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class Readiness(BaseModel):
    status: str = Field(description="ready, degraded (Redis down, still serving) or not_ready")
    checks: dict[str, dict[str, Any]] = Field(description="triton, models, redis: each with its status")


class Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    optional: bool | None = None


class Model(BaseModel):
    name: str
    version: str
    versions: list[str]
    state: str
    platform: str
    max_batch_size: int
    inputs: list[Tensor]
    outputs: list[Tensor]
    cache_enabled: bool


class VersionState(BaseModel):
    state: str
    reason: str = ""


class ModelEntry(BaseModel):
    """One model of the repository; a READY one also carries its latest version's metadata."""

    name: str
    state: str
    versions: dict[str, VersionState]
    reason: str | None = None
    version: str | None = None
    platform: str | None = None
    max_batch_size: int | None = None
    inputs: list[Tensor] | None = None
    outputs: list[Tensor] | None = None
    cache_enabled: bool | None = None


class ModelList(BaseModel):
    models: list[ModelEntry]


class V2ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class V2Tensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class V2ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[V2Tensor]
    outputs: list[V2Tensor]


class V2IndexEntry(BaseModel):
    name: str
    version: str | None = None
    state: str | None = None
    reason: str | None = None


class V2Live(BaseModel):
    live: bool


class V2Ready(BaseModel):
    ready: bool


class V2ModelReady(BaseModel):
    name: str
    ready: bool


_TRITON = (502, 503, 504)  # any call to Triton (app.clients.grpc_status.from_grpc, app.errors.from_http)
TRITON_ERRORS = errors(*_TRITON)
MODEL_ERRORS = errors(404, *_TRITON, notes={404: "model or version not found (or no ready version)"})
V2_ERRORS = errors(*_TRITON, kserve=True)
V2_MODEL_ERRORS = errors(
    404, *_TRITON, kserve=True, notes={404: "model or version not found (or no ready version)"}
)
V2_STATS_ERRORS = errors(
    400, 404, *_TRITON, kserve=True,
    notes={400: "Triton refused the request (e.g. that version is not available)", 404: "model not found"},
)  # fmt: skip


# --- jobs (app.frontends.jobs.routes) ------------------------------------------------------------
class JobLinks(BaseModel):
    status_url: str = Field(description="GET it for the job; DELETE it to cancel a queued job")
    ws_url: str = Field(description="a WebSocket pushing the job's status changes, then the job")


class JobAccepted(JobLinks):
    id: str
    status: str = Field(description="queued, or succeeded when answered from the cache at once")


class InferResult(BaseModel):
    """A ``/v1`` infer answer (also a job's ``result``)."""

    model: str
    model_version: str
    outputs: dict[str, list[Any]] = Field(description="output name -> nested list of its values")


class JobWebhook(BaseModel):
    url: str
    id: str = Field(description="the delivery id the receiver sees (webhook-id)")
    status: str = Field(description="waiting, delivered or failed")
    attempts: list[dict[str, Any]] = Field(description="one entry per delivery attempt")


class Job(JobLinks):
    id: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    model: str
    version: str | None
    priority: str = Field(description="high or normal")
    created_at: str | None = Field(description="ISO 8601, UTC")
    started_at: str | None
    finished_at: str | None
    attempts: int
    result: InferResult | None = Field(None, description="when succeeded")
    cache: str | None = Field(None, description="hit or miss, when succeeded")
    error: ErrorInfo | None = Field(None, description="when failed")
    webhook: JobWebhook | None = Field(None, description="when submitted with a webhook")


class JobStats(BaseModel):
    queue_depth: int
    queue_depth_by_priority: dict[str, int]
    oldest_pending_age_seconds: float
    jobs_total: dict[str, int] = Field(description="jobs by status, cluster-wide")
    webhook_deliveries_total: dict[str, int] = Field(description="webhook deliveries by outcome")
    webhooks_scheduled: int
    dead_letters: int
    websockets_open: int = Field(description="this replica's open job WebSockets")


_ACCEPTED_HEADERS = {
    "Location": {"description": "the job's status_url", "schema": {"type": "string"}},
    "Idempotent-Replayed": {"description": "true when an Idempotency-Key named an existing job",
                            "schema": {"type": "string", "enum": ["true"]}},
}  # fmt: skip
JOB_SUBMIT_RESPONSES: dict[int | str, dict[str, Any]] = {202: {"headers": _ACCEPTED_HEADERS}, **errors(
    400, 404, 413, 422, 501, *_TRITON,
    notes={404: "model or version not found", 413: "body over TGW_JOB_MAX_BODY_BYTES",
           501: "a decoupled model: served over gRPC ModelStreamInfer only",
           422: "invalid input (names the field), or an Idempotency-Key reused with another body",
           503: "Triton or the job store (Redis) unavailable, or the job queue full (Retry-After)"},
)}  # fmt: skip
_JOB_NOT_FOUND = "no such job (unknown, expired, or another tenant's)"
_STORE_DOWN = "the job store (Redis) unavailable (Retry-After)"
JOB_ERRORS = errors(404, 503, notes={404: _JOB_NOT_FOUND, 503: _STORE_DOWN})
JOB_CANCEL_ERRORS = errors(
    404, 409, 503, notes={404: _JOB_NOT_FOUND, 409: "the job is no longer queued", 503: _STORE_DOWN}
)
JOB_STATS_ERRORS = errors(503, notes={503: _STORE_DOWN})


# --- the whole document --------------------------------------------------------------------------------
def document_errors(app: FastAPI) -> None:
    """Put the error schemas in ``app.openapi()``'s components and correct FastAPI's own 422: it
    declares ``HTTPValidationError`` (``{"detail": [...]}``), but a request validation error is answered
    in the gateway's error shape (``app.errors``), and under ``/v2`` it is a 400 (KServe v2)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            _, defs = models_json_schema(
                [(m, "serialization") for m in (Error, KServeError)], ref_template=REF_TEMPLATE
            )
            components.update(defs.get("$defs", {}))
            for path, operations in schema["paths"].items():
                kserve = path == "/v2" or path.startswith("/v2/")
                for op in operations.values():
                    _own_validation_error(op, kserve)
            used = orjson.dumps(schema["paths"])
            for name in ("HTTPValidationError", "ValidationError"):
                if f'"{REF_TEMPLATE.format(model=name)}"'.encode() not in used:
                    components.pop(name, None)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def _own_validation_error(op: dict[str, Any], kserve: bool) -> None:
    responses = op.get("responses", {})
    declared = responses.get("422", {}).get("content", {}).get("application/json", {}).get("schema", {})
    if declared.get("$ref") != REF_TEMPLATE.format(model="HTTPValidationError"):
        return
    del responses["422"]
    if "requestBody" not in op and all(_any_string(p.get("schema", {})) for p in op.get("parameters", [])):
        return  # only plain string parameters: nothing FastAPI could refuse
    text = "invalid request parameters (names the field)"
    if kserve:
        responses.setdefault("400", {"description": text, "content": {"application/json": {
            "schema": error_ref(kserve=True)}}})  # fmt: skip
    else:
        responses["422"] = {"description": text, "content": {"application/json": {"schema": error_ref()}}}


def _any_string(schema: dict[str, Any]) -> bool:
    """A parameter any string (or none) satisfies: ``str`` or ``str | None``, no constraints."""
    options = schema.get("anyOf", [{"type": schema.get("type")}])
    plain = all(o in ({"type": "string"}, {"type": "null"}) for o in options)
    return plain and set(schema) <= {"anyOf", "type", "title", "default"}


# --- infer bodies read by the routes themselves (no pydantic model): /v1 infer, job submissions ---------
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


def infer_operation(
    *, tag: str, summary: str, operation_id: str, request: dict[str, Any], answer: dict[str, Any],
    codes: tuple[int, ...] = (), errors: dict[int, str] | None = None, kserve: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """The OpenAPI operation of an infer route (a raw route's, ``app.frontends.http.routes``): its request
    body, its answer's content, and the errors every infer route has (plus ``codes``; ``errors`` overrides
    texts). The path parameters come from the route's template."""
    texts = {**ERROR_TEXT, 404: "model or version not found",
             501: "a decoupled model: served over gRPC ModelStreamInfer only", **(errors or {})}  # fmt: skip
    content = {"application/json": {"schema": error_ref(kserve=kserve)}}
    responses: dict[str, Any] = {"200": {"description": "the model's answer", "content": answer}}
    for code in sorted({400, 404, 413, 501, 502, 503, 504, *codes}):
        responses[str(code)] = {"description": texts[code], "content": content}
    return {"tags": [tag], "summary": summary, "operationId": operation_id, **request, "responses": responses}
