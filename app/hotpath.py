"""The inference hot path, served before FastAPI's middleware stack.

``POST /v1/models/{model}[/versions/{version}]/infer`` and ``POST /v2/models/{model}[/versions/{version}]
/infer`` are the only requests that arrive thousands of times a second. ``GatewayApp.__call__`` hands them
to ``HotPath.serve``, which does in one function what the layers around a route would do for them (each
layer wraps ``receive``/``send`` and costs a few µs per message; measured: ~40 % of a cache hit's CPU):

* the request id (echoed or generated) on the response, and as ``current_request_id()`` for Triton;
* the body limit: a declared ``Content-Length`` over ``TGW_MAX_BODY_BYTES`` is answered 413 unread, a
  streamed body is cut off as it crosses it;
* the same handlers as the routes (``app.routers.infer.serve_v1``, ``app.routers.v2.serve_v2``), the same
  error rendering (``GatewayError`` -> its status; anything else -> 500 ``internal_error``, logged);
* the same telemetry: ``http_requests_total`` / ``http_request_duration_seconds`` with the route template
  as ``handler`` (the instrumentator's own metric functions), ``tgw_inflight_requests``,
  ``tgw_request/response_size_bytes``, the tracing SERVER span, the access-log line, and
  ``Connection: close`` while draining.

Everything else (other paths and methods, WebSockets, lifespan) goes through FastAPI unchanged.
``TGW_FAST_PATH=false`` sends the infer routes through FastAPI too (same answers; tested).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from app.errors import (
    GatewayError,
    PayloadTooLarge,
    body_too_large,
    error_body,
    log_gateway_error,
    log_unhandled,
)
from app.observability import metrics, tracing
from app.observability.context import begin_request
from app.observability.middleware import log_access
from app.request_context import set_request_id
from app.routers.common import JSON, Reply
from app.routers.infer import serve_v1
from app.routers.v2 import serve_v2
from app.services.kserve import HEADER_LENGTH

logger = logging.getLogger(__name__)

_HEADER_LENGTH = HEADER_LENGTH.encode()
_CLOSE = (b"connection", b"close")
_TEMPLATES = {
    ("v1", False): "/v1/models/{model}/infer",
    ("v1", True): "/v1/models/{model}/versions/{version}/infer",
    ("v2", False): "/v2/models/{model}/infer",
    ("v2", True): "/v2/models/{model}/versions/{version}/infer",
}


class Route(NamedTuple):
    api: str  # "v1" or "v2"
    model: str
    version: str | None

    @property
    def template(self) -> str:
        return _TEMPLATES[(self.api, self.version is not None)]


def match_infer(path: str) -> Route | None:
    """``/v1/models/m/infer`` -> ("v1", "m", None); ``/v2/models/m/versions/3/infer`` -> ("v2", "m", "3")."""
    parts = path.split("/")
    n = len(parts)
    if n not in (5, 7) or parts[0] or parts[2] != "models" or parts[-1] != "infer":
        return None
    api = parts[1]
    if api not in ("v1", "v2") or not parts[3]:
        return None
    if n == 5:
        return Route(api, parts[3], None)
    if parts[4] != "versions" or not parts[5]:
        return None
    return Route(api, parts[3], parts[5])


@dataclass(slots=True)
class _HttpInfo:
    """What the instrumentator's metric functions read from its ``Info``."""

    modified_handler: str
    method: str
    modified_status: str
    modified_duration: float


class _Disconnected(Exception):
    pass


class HotPath:
    def __init__(
        self, app: FastAPI, max_body_bytes: int, http_metrics: Sequence[Callable[[Any], None]] = ()
    ) -> None:
        self.state = app.state
        self.max_body_bytes = max_body_bytes
        self.http_metrics = tuple(http_metrics)

    def match(self, scope: Scope) -> Route | None:
        path: str = scope["path"]
        if not path.endswith("/infer"):
            return None
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return match_infer(path)

    async def serve(self, scope: Scope, receive: Receive, send: Send, route: Route) -> None:
        if tracing.enabled():
            with tracing.server_span(scope) as current:
                await self._serve(scope, receive, send, route, current)
        else:
            await self._serve(scope, receive, send, route, None)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, route: Route, span: Any) -> None:
        start = time.perf_counter()
        info = begin_request()
        incoming = cache_control = header_length = None
        declared = -1
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                incoming = value.decode("latin-1")
            elif key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
            elif key == b"cache-control":
                cache_control = value.decode("latin-1")
            elif key == _HEADER_LENGTH:
                header_length = value.decode("latin-1")
        rid = set_request_id(incoming)
        metrics.INFLIGHT.inc()
        received = 0
        close = False
        auth = getattr(self.state, "auth", None)  # TEMPORARY (issue 12): until app/pipeline.py
        principal = None
        try:
            try:
                if auth is not None:
                    principal = await auth.admit(scope)
                if declared > self.max_body_bytes:
                    raise body_too_large(self.max_body_bytes, declared)
                body = await self._read_body(receive)
                received = len(body)
                reply = await self._handle(route, body, cache_control, header_length)
            except GatewayError as exc:
                log_gateway_error(exc)
                close = isinstance(exc, PayloadTooLarge)
                reply = _error_reply(route, exc.status_code, exc.code, exc.message, exc.details, exc.headers)
            except _Disconnected:
                reply = None
            except Exception as exc:
                status, code, message = log_unhandled(exc)
                reply = _error_reply(route, status, code, message, None, None)
            if reply is None:
                status = 499  # the client went away before its body arrived; nothing to send
            else:
                status = reply.status
                headers = [
                    (b"content-type", reply.content_type),
                    (b"content-length", b"%d" % len(reply.body)),
                    (b"x-request-id", rid.encode()),
                    *reply.headers,
                ]
                if close or self.state.lifecycle.draining:
                    headers.append(_CLOSE)
                await send({"type": "http.response.start", "status": status, "headers": headers})
                await send({"type": "http.response.body", "body": reply.body})
        finally:
            metrics.INFLIGHT.dec()
            if principal is not None and auth is not None:
                auth.release(principal)
        duration = time.perf_counter() - start
        metrics.REQUEST_SIZE.observe(received)
        metrics.RESPONSE_SIZE.observe(len(reply.body) if reply is not None else 0)
        if self.http_metrics:
            http = _HttpInfo(route.template, "POST", str(status), duration)
            for fn in self.http_metrics:
                fn(http)
        if span is not None:
            tracing.finish_server_span(span, scope, status, rid, route.template)
        log_access(rid, "POST", scope["path"], status, duration, info)

    async def _read_body(self, receive: Receive) -> bytes:
        limit = self.max_body_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise body_too_large(limit)
                chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _handle(
        self, route: Route, body: bytes, cache_control: str | None, header_length: str | None
    ) -> Reply:
        state = self.state
        if route.api == "v1":
            return await serve_v1(state.inference, body, cache_control, route.model, route.version)
        return await serve_v2(
            state.inference, state.registry, body, cache_control, header_length, route.model, route.version
        )


def _error_reply(
    route: Route, status: int, code: str, message: str, details: dict[str, Any] | None,
    headers: dict[str, str] | None,
) -> Reply:  # fmt: skip
    extra = tuple((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items())
    return Reply(status, error_body(code, message, details, kserve=route.api == "v2"), JSON, extra)


class GatewayApp(FastAPI):
    """FastAPI, with the infer routes answered by ``hot`` before the middleware stack (when set)."""

    hot: HotPath | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = self.hot
        if hot is not None and scope["type"] == "http" and scope["method"] == "POST":
            route = hot.match(scope)
            if route is not None:
                await hot.serve(scope, receive, send, route)
                return
        await super().__call__(scope, receive, send)
