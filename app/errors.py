"""Domain exceptions: each class is one row of the table both renderings read (``status_code``, ``code``,
and ``Retry-After`` in ``headers``), and the one error shape ``error_body`` writes.

Every error leaves the gateway in one shape: ``{"error": {"code", "message", "details"}}``. No framework
here: the HTTP rendering (FastAPI's exception handlers) is ``app.frontends.http.web``, the gRPC one
``app.frontends.grpc.status``, and Triton's gRPC statuses become these errors in ``app.clients.grpc_status``.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from app.request_context import current_request_id

logger = logging.getLogger(__name__)


class GatewayError(Exception):
    """A domain error. A subclass is one row of the table: ``class NotFound(GatewayError, status=404,
    code="not_found")`` (a subclass that names neither keeps its parent's)."""

    status_code = 500
    code = "internal_error"

    def __init_subclass__(cls, status: int | None = None, code: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if status is not None:
            cls.status_code = status
        if code is not None:
            cls.code = code

    def __init__(
        self,
        message: str,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.headers = headers or {}

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickled with its status, details and headers whatever the subclass's ``__init__`` takes: an error
        raised while a body is decoded in a child process (``app.services.offload``) crosses back whole."""
        return _rebuild_error, (type(self), self.message), self.__dict__


def _rebuild_error(cls: type[GatewayError], message: str) -> GatewayError:
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    return exc


class BadRequest(GatewayError, status=400, code="bad_request"):
    pass


class InvalidInput(GatewayError, status=422, code="invalid_input"):
    pass


class PayloadTooLarge(GatewayError, status=413, code="payload_too_large"):
    pass


def body_too_large(limit: int, declared: int | None = None) -> PayloadTooLarge:
    """The 413 of ``TGW_MAX_BODY_BYTES``: for a declared ``Content-Length``, or a body cut off while read."""
    if declared is not None:
        return PayloadTooLarge(
            f"request body is {declared} bytes, the limit is {limit} (TGW_MAX_BODY_BYTES)",
            {"limit_bytes": limit, "received_bytes": declared},
        )
    return PayloadTooLarge(
        f"request body exceeds the limit of {limit} bytes (TGW_MAX_BODY_BYTES)", {"limit_bytes": limit}
    )


class NotFound(GatewayError, status=404, code="not_found"):
    pass


class ModelNotFound(NotFound, code="model_not_found"):
    pass


class Conflict(GatewayError, status=409, code="conflict"):
    pass


class ServiceUnavailable(GatewayError, status=503, code="unavailable"):
    """503 with Retry-After: not ready, upstream unreachable, overloaded."""

    def __init__(self, message: str, details: dict[str, Any] | None = None, retry_after_s: int = 2) -> None:
        super().__init__(message, details, {"Retry-After": str(retry_after_s)})


class UpstreamUnavailable(ServiceUnavailable, code="triton_unavailable"):
    pass


class UpstreamError(GatewayError, status=502, code="triton_error"):
    pass


class UpstreamRejected(BadRequest, code="triton_rejected_input"):
    """Triton refused the request's content (gRPC INVALID_ARGUMENT, HTTP 400): the client's error, passed
    on as 400 with Triton's message, never retried (a 502 would read as a server fault and be retried)."""


class NotOffered(GatewayError, status=501, code="not_offered"):
    """A Triton endpoint the gateway deliberately does not offer (``app.services.offer``)."""


class NotProxied(NotOffered, status=403, code="not_proxied"):
    """A Triton control endpoint the gateway deliberately keeps from its clients."""


class UpstreamTimeout(GatewayError, status=504, code="triton_timeout"):
    pass


def upstream_error(
    cls: type[GatewayError], message: str, details: dict[str, Any], retry_after_s: int
) -> GatewayError:
    """A failure Triton reported as ``cls`` (``from_http`` here, ``app.clients.grpc_status.from_grpc``)."""
    if issubclass(cls, ServiceUnavailable):
        return cls(f"Triton is unavailable: {message}", details, retry_after_s=retry_after_s)
    if cls is UpstreamTimeout:
        return cls("Triton did not answer before the deadline", details)
    if cls is ModelNotFound:
        return cls(f"Triton does not serve it: {message}", details)
    return cls(f"Triton rejected the request: {message}", details)


# HTTP status of a Triton inference answer (KServe v2 over HTTP) -> the domain error it becomes.
_HTTP_TO_ERROR: dict[int, type[GatewayError]] = {
    400: UpstreamRejected,
    404: ModelNotFound,
    429: UpstreamUnavailable,
    503: UpstreamUnavailable,
    408: UpstreamTimeout,
    504: UpstreamTimeout,
}


def from_http(status: int, message: str, retry_after_s: int = 2) -> GatewayError:
    """The same errors as ``app.clients.grpc_status.from_grpc`` for Triton's HTTP endpoint; any other 4xx
    is the client's error (400, never retried), anything else a 502."""
    cls = _HTTP_TO_ERROR.get(status, UpstreamRejected if 400 <= status < 500 else UpstreamError)
    return upstream_error(cls, message, {"http_status": status}, retry_after_s)


def is_kserve_path(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def kserve_status(status: int) -> int:
    """Under ``/v2`` a request the gateway refuses as invalid is 400, as the KServe v2 protocol and
    Triton answer it (the ``/v1`` API keeps 422); the message still names the field."""
    return 400 if status == 422 else status


def error_body(code: str, message: str, details: dict[str, Any] | None = None, kserve: bool = False) -> bytes:
    """The one error shape. Under ``/v2`` the KServe v2 protocol mandates ``"error"`` to be the message
    string (``tritonclient.http`` reads it so), so there ``code`` and ``details`` sit beside it."""
    if kserve:
        return orjson.dumps({"error": message, "code": code, "details": details or {}})
    return orjson.dumps({"error": {"code": code, "message": message, "details": details or {}}})


def log_gateway_error(exc: GatewayError) -> None:
    if exc.status_code >= 500:
        logger.warning("%s: %s", exc.code, exc.message)


def log_unhandled(exc: BaseException) -> tuple[int, str, str]:
    """Log an unexpected exception with its traceback and the request id the client's answer carries;
    returns what the client gets (no trace)."""
    logger.error("unhandled error", exc_info=exc, extra={"request_id": current_request_id()})
    return 500, "internal_error", "internal error; see the gateway log for this request id"
