"""Raw-ASGI answer for a refused request (401/403/429/503 from ``AuthStage.admit``): the gateway's error
JSON on HTTP; on a WebSocket handshake an HTTP denial response where the server supports the ASGI
``websocket.http.response`` extension (uvicorn does), else close 1008 (policy violation)."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

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
