"""Triton's gRPC statuses -> the gateway's domain errors (``app.errors``), for the gRPC clients
(``app.clients.triton``, ``app.clients.triton_shm``); ``app.errors.from_http`` is the same for Triton's
HTTP endpoint. The other direction, a domain error as the gRPC door's status, is
``app.frontends.grpc.status``.
"""

from __future__ import annotations

import grpc

from app.errors import (
    GatewayError,
    ModelNotFound,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnavailable,
    upstream_error,
)

# gRPC status of a Triton call -> the domain error it becomes. Anything not listed is a 502.
_GRPC_TO_ERROR: dict[grpc.StatusCode, type[GatewayError]] = {
    grpc.StatusCode.UNAVAILABLE: UpstreamUnavailable,
    grpc.StatusCode.RESOURCE_EXHAUSTED: UpstreamUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: UpstreamTimeout,
    grpc.StatusCode.NOT_FOUND: ModelNotFound,
    grpc.StatusCode.INVALID_ARGUMENT: UpstreamRejected,
    grpc.StatusCode.OUT_OF_RANGE: UpstreamRejected,
    grpc.StatusCode.FAILED_PRECONDITION: UpstreamError,
    grpc.StatusCode.INTERNAL: UpstreamError,
    grpc.StatusCode.UNKNOWN: UpstreamError,
    grpc.StatusCode.UNIMPLEMENTED: UpstreamError,
    grpc.StatusCode.CANCELLED: UpstreamError,
    grpc.StatusCode.ABORTED: UpstreamError,
}


def grpc_status_from_text(status: str | None) -> grpc.StatusCode | None:
    """tritonclient reports the status as text, e.g. ``"StatusCode.UNAVAILABLE"``."""
    if not status:
        return None
    name = status.rsplit(".", 1)[-1]
    return grpc.StatusCode.__members__.get(name)


def from_grpc(status: grpc.StatusCode | None, message: str, retry_after_s: int = 2) -> GatewayError:
    cls = _GRPC_TO_ERROR.get(status, UpstreamError) if status else UpstreamError
    return upstream_error(cls, message, {"grpc_status": status.name if status else "UNKNOWN"}, retry_after_s)
