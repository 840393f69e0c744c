"""Raw-ASGI answer for a refused request (401/403/429/503 from ``AuthStage.admit``): the gateway's error
JSON on HTTP; on a WebSocket handshake an HTTP denial response where the server supports the ASGI
``websocket.http.response`` extension (uvicorn does), else close 1008 (policy violation)."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import orjson

from app.errors import GatewayError, error_body, is_kserve_path


def _headers(exc: GatewayError, body: bytes, request_id: str | None) -> list[tuple[bytes, bytes]]:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()),
    ]
    if request_id:
        headers.append((b"x-request-id", request_id.encode()))
    return headers


async def send_refusal(scope: MutableMapping[str, Any], receive: Any, send: Any, exc: GatewayError,
                       request_id: str | None = None) -> None:  # fmt: skip
    body = error_body(exc.code, exc.message, exc.details, kserve=is_kserve_path(scope.get("path", "")))
    if scope["type"] == "http":
        start = {"type": "http.response.start", "status": exc.status_code,
                 "headers": _headers(exc, body, request_id)}  # fmt: skip
        await send(start)
        await send({"type": "http.response.body", "body": body})
        return
    message = await receive()  # websocket.connect
    if message["type"] != "websocket.connect":
        return
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": exc.status_code,
                    "headers": _headers(exc, body, request_id)})  # fmt: skip
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": exc.code})


def limit_websocket_frames(stage: Any, principal: Any, receive: Any, send: Any) -> Any:
    """``receive`` for an admitted WebSocket: each client frame counts against the key's request rate
    (``AuthStage.admit_message``); a frame over the limit is answered with an error frame and never
    reaches the route."""
    if principal.limits is None:
        return receive

    async def limited() -> Any:
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return message
            try:
                await stage.admit_message(principal)
            except GatewayError as exc:
                frame = {"type": "error", "error": {"code": exc.code, "message": exc.message,
                                                    "details": exc.details}}  # fmt: skip
                await send({"type": "websocket.send", "text": orjson.dumps(frame).decode()})
                continue
            return message

    return limited
