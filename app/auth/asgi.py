"""Raw-ASGI helper of the auth stage: client WebSocket frames counted against the key's limits
(``AuthStage.websocket_receive``, called by the pipeline for an admitted WebSocket)."""

from __future__ import annotations

from typing import Any

import orjson

from app.errors import GatewayError


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
