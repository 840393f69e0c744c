"""The key of an admitted WebSocket while the socket lives (``KeyCheck``, handed by the ``/v1/ws`` door to
the job sockets, ``app.services.jobs.sockets``): checked again on every frame and by a poller, and each
frame counted against the key's request rate (a frame over it is answered with an error frame by the
socket, which records it as a request like any other refused frame)."""

from __future__ import annotations

import asyncio
from typing import Any

from app.auth.principal import Principal, Unauthorized


class KeyCheck:
    """The key an admitted socket was opened with, checked again (``AuthStage.recheck``): on every
    frame (``frame``) and by a poller (``revoked``, which returns once the key is gone); ``admit``: a frame
    counts against the key's request rate (raises ``TooManyRequests`` over it)."""

    def __init__(self, stage: Any, principal: Principal) -> None:
        self.stage, self.principal = stage, principal
        self.every_s = min(1.0, max(stage.cache_s / 5, 0.1))

    @classmethod
    def of(cls, ws: Any) -> KeyCheck | None:
        """For an accepted WebSocket (``starlette.websockets.WebSocket``); None when there is no key."""
        principal = ws.scope.get("state", {}).get("principal")
        stage = getattr(ws.app.state, "auth", None)
        if not isinstance(principal, Principal) or stage is None or not principal.extra.get("digest"):
            return None  # auth off, or the admin token: nothing to revoke, no limits
        return cls(stage, principal)

    async def frame(self) -> bool:
        """False once the key is revoked or rotated away."""
        try:
            await self.stage.recheck(self.principal)
        except Unauthorized:
            return False
        return True

    async def admit(self) -> None:
        await self.stage.admit_message(self.principal)

    async def revoked(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.stage.recheck(self.principal, slack_s=self.every_s)
            except Unauthorized:
                return
