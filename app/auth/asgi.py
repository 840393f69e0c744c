"""Raw-ASGI helpers of the auth stage for an admitted WebSocket: client frames counted against the key's
limits (``AuthStage.websocket_receive``, called by the pipeline), and the key checked again while the
socket lives (``KeyCheck``, handed by the routers to the job sockets, ``app.services.jobs.sockets``)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from app.auth.principal import Principal, Unauthorized
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


class KeyCheck:
    """The key an admitted socket was opened with, checked again (``AuthStage.recheck``): on every
    frame (``frame``) and by a poller (``revoked``, which returns once the key is gone)."""

    def __init__(self, stage: Any, principal: Principal) -> None:
        self.stage, self.principal = stage, principal
        self.every_s = min(1.0, max(stage.cache_s / 5, 0.1))

    @classmethod
    def of(cls, ws: Any) -> KeyCheck | None:
        """For an accepted WebSocket (``starlette.websockets.WebSocket``); None when there is no key."""
        principal = ws.scope.get("state", {}).get("principal")
        stage = getattr(ws.app.state, "auth", None)
        if not isinstance(principal, Principal) or stage is None or not principal.extra.get("digest"):
            return None  # auth off, or the admin token: nothing to revoke
        return cls(stage, principal)

    async def frame(self) -> bool:
        """False once the key is revoked or rotated away."""
        try:
            await self.stage.recheck(self.principal)
        except Unauthorized:
            return False
        return True

    async def revoked(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.stage.recheck(self.principal, slack_s=self.every_s)
            except Unauthorized:
                return
