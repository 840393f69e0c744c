"""The one request pipeline: a single pure-ASGI layer in front of FastAPI that owns what every HTTP
request needs, in this order:

1. the request id (``X-Request-ID`` echoed when sane, else generated): on the response, in
   ``current_request_id()`` for logs and Triton, in ``scope["state"]["request_id"]``;
2. the tracing SERVER span (when tracing is on);
3. admission (``Admission``: authentication and limits, when configured);
4. the body limit: a declared ``Content-Length`` over ``TGW_MAX_BODY_BYTES`` is answered 413 unread, a
   streamed body is cut off as it crosses it;
5. dispatch: the raw routes (the infer routes, ``POST /v1|/v2/models/{model}[/versions/{version}]/infer``)
   are answered by ``RawRouter`` over the raw route table (``app.frontends.http.routes``: transport-neutral
   handlers, no framework layers on the path that runs thousands of times a second); a handler's
   ``SSEReply`` (the streaming routes: ``/v1/.../stream``, ``/v2/.../generate_stream``) is written as
   server-sent events (``app.frontends.http.sse``) while the request's grant is held, so a stream keeps its
   key's in-flight slot until it ends; everything else falls through to FastAPI;
6. ``Connection: close`` while draining, ``Server-Timing`` on infer answers;
7. telemetry once per request: ``tgw_inflight_requests``, ``tgw_request/response_size_bytes``, the
   instrumentator's ``http_requests_total`` / ``http_request_duration_seconds`` labelled with the route
   template (the raw route's; FastAPI's route's, also for a request refused before FastAPI routed it,
   through ``templates``; untemplated paths are left out, as the instrumentator does),
   ``tgw_stage_duration_seconds``,
   and the one access-log line (the last two by ``Requests``, which every door calls).

WebSocket connections get the request id (and admission) and go on to FastAPI (a refused handshake is
recorded as a request of its route); lifespan passes through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.codecs.common import JSON, Reply
from app.errors import (
    GatewayError,
    PayloadTooLarge,
    body_too_large,
    error_body,
    is_kserve_path,
    kserve_status,
    log_gateway_error,
    log_unhandled,
)
from app.frontends.http.routes import RawRouter
from app.frontends.http.sse import SSEReply
from app.observability import metrics, tracing
from app.observability.context import RequestInfo
from app.observability.requests import Requests
from app.request_context import Caller, RequestContext, cache_directives, set_request_id

logger = logging.getLogger(__name__)

_CLOSE = (b"connection", b"close")
_STAGES = ("cache", "queue", "triton")
Templates = Callable[[Scope], str | None]  # a route template for what the pipeline refused itself


class Admission(Protocol):
    """Authentication and limits: ``admit`` raises a ``GatewayError`` (401/403/429) or returns
    a grant that ``release`` gets back when the request is over."""

    async def admit(self, scope: Scope) -> Any: ...

    def release(self, grant: Any) -> None: ...


async def _refuse_websocket(scope: Scope, receive: Receive, send: Send, exc: GatewayError, rid: str) -> None:
    """A refused handshake: an HTTP answer (401/403/429 with the error JSON and headers) where the server
    supports the ASGI ``websocket.http.response`` extension (uvicorn does), else close 1008."""
    message = await receive()  # websocket.connect
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": exc.message[:120]})
        return
    body = error_body(exc.code, exc.message, exc.details, kserve=is_kserve_path(scope.get("path", "")))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"x-request-id", rid.encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()),
    ]
    await send({"type": "websocket.http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})


class DrainState(Protocol):
    draining: bool


class _Disconnected(Exception):
    pass


class Pipeline:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        lifecycle: DrainState | None = None,
        router: RawRouter | None = None,
        templates: Templates | None = None,
        admission: Admission | None = None,
        requests: Requests | None = None,
        server_timing: bool = True,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.lifecycle = lifecycle
        self.router = router
        self.templates = templates
        self.admission = admission
        self.requests = requests or Requests()
        self.server_timing = server_timing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if tracing.enabled():
                with tracing.server_span(scope) as span:
                    await self._http(scope, receive, send, span)
            else:
                await self._http(scope, receive, send, None)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    # --- WebSocket: request id and admission, then FastAPI -------------------------------------------
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        incoming = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                incoming = value.decode("latin-1")
        rid = set_request_id(incoming)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        grant = None
        if self.admission is not None:
            served = self.requests.begin("http", "GET", scope["path"], rid)
            try:
                grant = await self.admission.admit(scope)
            except GatewayError as exc:
                await _refuse_websocket(scope, receive, send, exc, rid)
                served.end(exc.status_code, self.templates(scope) if self.templates is not None else None)
                return
        try:
            await self.app(scope, receive, send)
        finally:
            if self.admission is not None and grant is not None:
                self.admission.release(grant)

    # --- HTTP ----------------------------------------------------------------------------------------
    async def _http(self, scope: Scope, receive: Receive, send: Send, span: Any) -> None:
        start = time.perf_counter()
        incoming = None
        declared = -1
        headers: dict[bytes, bytes] = {}
        for key, value in scope["headers"]:
            headers[key] = value
            if key == b"x-request-id":
                incoming = value.decode("latin-1")
            elif key == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
        rid = set_request_id(incoming)
        served = self.requests.begin("http", scope["method"], scope["path"], rid, span, start)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode())
        route = self.router.match(scope) if self.router is not None else None
        template: str | None = route.route.template if route is not None else None
        status = 500
        sent = 0
        received = max(declared, 0)
        grant = None
        disconnected = False
        metrics.INFLIGHT.inc()
        try:
            reply: Reply | SSEReply | None = None
            try:
                if self.admission is not None:
                    grant = await self.admission.admit(scope)
                    state["grant"] = grant
                if declared > self.max_body_bytes:
                    raise body_too_large(self.max_body_bytes, declared)
                if route is not None:
                    body = await self._read_body(receive)
                    received = len(body)
                    caller = grant if isinstance(grant, Caller) else None  # the key that was admitted
                    ctx = RequestContext(rid, route.route.door, caller)
                    cache_control = headers.get(b"cache-control")
                    if cache_control is not None:
                        ctx.cache_read, ctx.cache_write = cache_directives(cache_control.decode("latin-1"))
                    reply = await self.router.handle(route, body, headers, ctx)  # type: ignore[union-attr]
            except GatewayError as exc:
                log_gateway_error(exc)
                reply = _error_reply(scope, exc.status_code, exc.code, exc.message, exc.details, exc.headers)
                if isinstance(exc, PayloadTooLarge):
                    reply = reply._replace(headers=(*reply.headers, _CLOSE))
            except _Disconnected:
                disconnected = True  # the client went away before its body arrived; nothing to send
                status = 499
            except Exception as exc:
                code, err, message = log_unhandled(exc)
                reply = _error_reply(scope, code, err, message, None, None)
            if grant is not None and isinstance(reply, Reply):
                reply = _usage_warning(grant, reply)
            if isinstance(reply, SSEReply):  # a stream: the grant (in-flight slot) is held until it ends
                status, sent = await self._send_stream(scope, receive, send, reply, rid_header)
            elif reply is not None:
                if route is None and self.templates is not None:  # refused before FastAPI routed it
                    template = self.templates(scope)
                status, sent = reply.status, len(reply.body)
                await self._send_reply(send, reply, rid_header, served.info, start, route is not None)
            elif not disconnected:  # everything but the infer routes: FastAPI
                status, sent, received = await self._fastapi(scope, receive, send, rid_header, declared)
                template = getattr(scope.get("route"), "path", None)
        finally:
            metrics.INFLIGHT.dec()
            if grant is not None:
                self.admission.release(grant)  # type: ignore[union-attr]
        metrics.REQUEST_SIZE.observe(received)
        metrics.RESPONSE_SIZE.observe(sent)
        served.end(status, template)

    async def _send_reply(
        self, send: Send, reply: Reply, rid_header: tuple[bytes, bytes], info: RequestInfo, start: float,
        infer: bool,
    ) -> None:  # fmt: skip
        headers = [
            (b"content-type", reply.content_type),
            (b"content-length", b"%d" % len(reply.body)),
            rid_header,
            *reply.headers,
        ]
        if infer:
            timings = info.timings
            total = time.perf_counter() - start
            metrics.observe_stages(timings, total)
            if self.server_timing:
                headers.append((b"server-timing", server_timing(timings, total)))
        if self.lifecycle is not None and self.lifecycle.draining:
            headers.append(_CLOSE)
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    async def _send_stream(
        self, scope: Scope, receive: Receive, send: Send, reply: SSEReply, rid_header: tuple[bytes, bytes]
    ) -> tuple[int, int]:
        """Write a streamed answer to its end, or until its client went away (status 499 then); the stream
        is closed in any case (one that had not ended is cancelled in Triton)."""
        head = [rid_header]
        if self.lifecycle is not None and self.lifecycle.draining:
            head.append(_CLOSE)
        try:
            return await reply.send(scope, receive, send, head)
        except Exception as exc:  # the head may be sent already: nothing else can be answered
            log_unhandled(exc)
            return 500, 0
        finally:
            await reply.aclose()

    async def _fastapi(
        self, scope: Scope, receive: Receive, send: Send, rid_header: tuple[bytes, bytes], declared: int
    ) -> tuple[int, int, int]:
        """Run the FastAPI app; returns (status, bytes sent, bytes received)."""
        status = 500
        sent = 0
        received = max(declared, 0)
        lifecycle = self.lifecycle
        limit = self.max_body_bytes

        async def send_wrapper(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                if not any(k == b"x-request-id" for k, _ in headers):
                    headers.append(rid_header)
                if lifecycle is not None and lifecycle.draining:
                    headers.append(_CLOSE)
                message["headers"] = headers
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        inner_receive = receive
        if declared < 0:  # no Content-Length: count (and bound) what streams in

            async def inner_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > limit:
                        raise body_too_large(limit)
                return message

        await self.app(scope, inner_receive, send_wrapper)
        return status, sent, received

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


def server_timing(timings: Mapping[str, float], total: float) -> bytes:
    """``cache;dur=0.21, queue;dur=0.01, triton;dur=0.93, total;dur=1.40`` (milliseconds)."""
    parts = [f"{stage};dur={timings[stage] * 1000:.2f}" for stage in _STAGES if stage in timings]
    parts.append(f"total;dur={total * 1000:.2f}")
    return ", ".join(parts).encode()


def _error_reply(
    scope: Scope, status: int, code: str, message: str, details: dict[str, Any] | None,
    headers: dict[str, str] | None,
) -> Reply:  # fmt: skip
    extra = tuple((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items())
    kserve = is_kserve_path(scope["path"])
    body = error_body(code, message, details, kserve=kserve)
    return Reply(kserve_status(status) if kserve else status, body, JSON, extra)


def _usage_warning(grant: Any, reply: Reply) -> Reply:
    """A key past a soft threshold of its monthly budget (``app.auth.stage.AuthStage.check_budget``): the
    answer carries ``Usage-Warning`` (docs/usage.md)."""
    extra = getattr(grant, "extra", None)
    warning = extra.get("usage_warning") if extra else None
    if warning is None:
        return reply
    return reply._replace(headers=(*reply.headers, (b"usage-warning", warning.encode("latin-1"))))
