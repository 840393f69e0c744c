"""The one table from the gateway's domain errors (``app.errors``) to gRPC status codes, as Triton uses
them: INVALID_ARGUMENT for a bad request, NOT_FOUND, UNAVAILABLE, DEADLINE_EXCEEDED.

Errors are matched by their HTTP status (every ``GatewayError`` has one), so an error class added later
(e.g. 401/403/429 from authentication and limits) maps without touching this file. An error Triton
returned keeps Triton's own code (``details["grpc_status"]``, or 400 from Triton's HTTP endpoint ->
INVALID_ARGUMENT), so a client sees what it would see talking to Triton.
"""

from __future__ import annotations

import grpc

from app.errors import GatewayError

HTTP_TO_GRPC: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    501: grpc.StatusCode.UNIMPLEMENTED,
    502: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(exc: GatewayError) -> grpc.StatusCode:
    upstream = exc.details.get("grpc_status")
    if isinstance(upstream, str) and upstream in grpc.StatusCode.__members__ and upstream != "UNKNOWN":
        return grpc.StatusCode[upstream]
    if exc.details.get("http_status") == 400:
        return grpc.StatusCode.INVALID_ARGUMENT
    return HTTP_TO_GRPC.get(exc.status_code, grpc.StatusCode.INTERNAL)
