"""What every HTTP door shares (``app.frontends.*``, ``app.main``):
JSON answers written by orjson (``ORJSONResponse``), the HTTP rendering of the gateway's errors (FastAPI's
exception handlers: every error leaves in the one shape of ``app.errors.error_body``, under ``/v2`` in the
KServe v2 one) and that shape's schemas in the OpenAPI document (``errors``, ``error_ref``)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from app.codecs.common import dumps
from app.errors import (
    GatewayError,
    error_body,
    is_kserve_path,
    kserve_status,
    log_gateway_error,
    log_unhandled,
)
from app.request_context import current_request_id


class ORJSONResponse(JSONResponse):
    """JSON written by orjson. A ``JSONResponse`` subclass so that FastAPI documents the route's
    ``response_model`` in the OpenAPI document (any other response class is declared a bare string)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


# --- the error answers ----------------------------------------------------------------------------------
def error_response(
    request: Request | None, status: int, code: str, message: str, details: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> Response:  # fmt: skip
    headers = dict(headers or {})
    rid = current_request_id()
    if rid:
        headers.setdefault("X-Request-ID", rid)
    kserve = request is not None and is_kserve_path(request.url.path)
    status = kserve_status(status) if kserve else status
    body = error_body(code, message, details, kserve)
    return Response(body, status, headers, media_type="application/json")


def gateway_error_response(request: Request | None, exc: GatewayError) -> Response:
    log_gateway_error(exc)
    return error_response(request, exc.status_code, exc.code, exc.message, exc.details, exc.headers)


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return gateway_error_response(request, exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": ".".join(str(p) for p in e.get("loc", ())), "message": e.get("msg", "")}
        for e in exc.errors()
    ]
    first = errors[0] if errors else {"field": "", "message": "invalid request"}
    message = f"{first['field']}: {first['message']}"
    return error_response(request, 422, "invalid_request", message, {"errors": errors})


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "payload_too_large"}


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_response(request, exc.status_code, code, str(exc.detail), None, dict(exc.headers or {}))


async def _unhandled(request: Request, exc: Exception) -> Response:
    status, code, message = log_unhandled(exc)
    return error_response(request, status, code, message)


EXCEPTION_HANDLERS = {
    GatewayError: _gateway_error,
    RequestValidationError: _validation_error,
    StarletteHTTPException: _http_error,
    Exception: _unhandled,
}


def install_exception_handlers(app: FastAPI) -> None:
    for exc_type, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exc_type, handler)


# --- their schemas in the OpenAPI document: the gateway's one error shape, and the KServe v2 one under /v2
REF_TEMPLATE = "#/components/schemas/{model}"


class ErrorInfo(BaseModel):
    code: str = Field(examples=["model_not_found"], description="machine-readable, e.g. invalid_input")
    message: str = Field(description="what went wrong; names the field and what was expected")
    details: dict[str, Any] = Field(description="e.g. field, expected, received, limit_bytes, job_id")


class Error(BaseModel):
    """Every error outside ``/v2``."""

    error: ErrorInfo


class KServeError(BaseModel):
    """Every error under ``/v2``: ``error`` is the message, as the KServe v2 protocol has it (what
    ``tritonclient.http`` reads); ``code`` and ``details`` as in the gateway's own shape."""

    error: str
    code: str
    details: dict[str, Any]


def error_ref(kserve: bool = False) -> dict[str, str]:
    """A ``$ref`` to the error schema, for operations documented by hand (``components`` gets both)."""
    return {"$ref": REF_TEMPLATE.format(model="KServeError" if kserve else "Error")}


# What each status means wherever it appears; an operation may say more (``notes``).
ERROR_TEXT = {
    400: "bad request: malformed or too deeply nested JSON (names the field)",
    403: "refused on purpose",
    404: "not found",
    409: "conflict with the resource's state",
    413: "request body too large (details.limit_bytes)",
    422: "invalid input: names the field and what was expected",
    501: "not offered by the gateway",
    502: "Triton failed",
    503: "unavailable: Triton or Redis unreachable, or overloaded (Retry-After)",
    504: "Triton did not answer before the deadline",
}


def errors(
    *codes: int, kserve: bool = False, notes: dict[int, str] | None = None
) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for the error statuses an operation really answers with, each with the
    error schema (under ``/v2``: ``kserve=True``, where invalid input is a 400, never a 422)."""
    model = KServeError if kserve else Error
    notes = notes or {}
    return {code: {"model": model, "description": notes.get(code, ERROR_TEXT[code])} for code in codes}
