"""The HTTP face of the gateway's errors, shared by the HTTP doors: FastAPI's exception handlers (every
error leaves in the one shape of ``app.errors.error_body``, under ``/v2`` in the KServe v2 one)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from app.errors import (
    GatewayError,
    error_body,
    is_kserve_path,
    kserve_status,
    log_gateway_error,
    log_unhandled,
)
from app.request_context import current_request_id


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
