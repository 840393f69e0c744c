"""Pure ASGI middleware (no per-request BaseHTTPMiddleware overhead).

``RequestContextMiddleware``: sets the request id (echoed from ``X-Request-ID`` or generated), adds it to
every response, and bounds the request body: a declared ``Content-Length`` above the limit is answered
413 before anything is read; a streamed body is cut off as soon as it crosses the limit.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth.asgi import limit_websocket_frames, send_refusal
from app.auth.principal import Principal
from app.errors import GatewayError, body_too_large, error_body, is_kserve_path
from app.request_context import set_request_id


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        incoming: str | None = None
        length: int | None = None
        for key, value in scope["headers"]:
            if key == b"x-request-id":
                incoming = value.decode("latin-1")
            elif key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = None
        rid = set_request_id(incoming)
        scope.setdefault("state", {})["request_id"] = rid
        rid_header = (b"x-request-id", rid.encode())

        # TEMPORARY (issue 12): the auth stage, until app/pipeline.py calls it
        auth = getattr(scope["app"].state, "auth", None) if "app" in scope else None
        principal: Principal | None = None
        if auth is not None:
            try:
                principal = await auth.admit(scope)
            except GatewayError as exc:
                await send_refusal(scope, receive, send, exc, rid)
                return
            if scope["type"] == "websocket":
                receive = limit_websocket_frames(auth, principal, receive, send)
        try:
            await self._serve(scope, receive, send, length, rid_header)
        finally:
            if principal is not None and auth is not None:
                auth.release(principal)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, length: int | None, rid_header: tuple[bytes, bytes]
    ) -> None:
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        limit = self.max_body_bytes
        if length is not None and length > limit:
            exc = body_too_large(limit, length)
            body = error_body(
                exc.code, exc.message, exc.details, kserve=is_kserve_path(scope.get("path", ""))
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 413,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                        rid_header,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise body_too_large(limit)
            return message

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k == b"x-request-id" for k, _ in headers):
                    headers.append(rid_header)
                message["headers"] = headers
            await send(message)

        await self.app(scope, limited_receive, send_with_id)
