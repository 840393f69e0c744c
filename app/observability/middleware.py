"""``ObservabilityMiddleware`` (pure ASGI, outermost): per HTTP request it keeps ``tgw_inflight_requests``,
observes ``tgw_request_size_bytes`` / ``tgw_response_size_bytes``, opens the tracing SERVER span when
tracing is on, and writes the one access-log line (``app.access``; probes and scrapes at DEBUG).

While the process drains (SIGTERM), responses carry ``Connection: close`` so clients stop reusing
keep-alive connections before the listener closes.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability import metrics, tracing
from app.observability.context import RequestInfo, begin_request

access_logger = logging.getLogger("app.access")

_QUIET_PATHS = frozenset({"/metrics", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
_CLOSE = (b"connection", b"close")


class DrainState(Protocol):
    draining: bool


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, lifecycle: DrainState | None = None) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if tracing.enabled():
            with tracing.server_span(scope) as current:
                await self._serve(scope, receive, send, current)
        else:
            await self._serve(scope, receive, send, None)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, current: Any) -> None:
        start = time.perf_counter()
        info = begin_request()
        status = 500
        sent = 0
        received = -1
        for key, value in scope["headers"]:
            if key == b"content-length":
                try:
                    received = int(value)
                except ValueError:
                    pass
                break
        lifecycle = self.lifecycle

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                if lifecycle is not None and lifecycle.draining:
                    message["headers"] = [*message.get("headers", ()), _CLOSE]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        inner_receive = receive
        if received < 0:
            received = 0

            async def inner_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                return message

        metrics.INFLIGHT.inc()
        try:
            await self.app(scope, inner_receive, send_wrapper)
        finally:
            metrics.INFLIGHT.dec()
            duration = time.perf_counter() - start
            metrics.REQUEST_SIZE.observe(received)
            metrics.RESPONSE_SIZE.observe(sent)
            state = scope.get("state") or {}
            request_id = state.get("request_id")
            if current is not None:
                tracing.finish_server_span(current, scope, status, request_id)
            log_access(request_id, scope["method"], scope["path"], status, duration, info)


def log_access(
    request_id: str | None, method: str, path: str, status: int, duration_s: float, info: RequestInfo
) -> None:
    """The one access-log line of an HTTP request (``app.access``; probes and scrapes at DEBUG)."""
    level = logging.DEBUG if path in _QUIET_PATHS else logging.INFO
    if not access_logger.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "request_id": request_id,
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(duration_s * 1000, 2),
    }
    if info.model is not None:
        fields["model"] = info.model
        fields["version"] = info.version
    if info.cache is not None:
        fields["cache"] = info.cache
    access_logger.log(level, "request", extra=fields)
