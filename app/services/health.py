"""Liveness and readiness: Triton live, every model in the repository ready, Redis reachable."""

from __future__ import annotations

import asyncio
from typing import Any

from app.clients.protocols import InferenceTransport, TritonAdmin
from app.services.cache import ResponseCache
from app.services.registry import summarize_index


class HealthService:
    def __init__(self, admin: TritonAdmin, transport: InferenceTransport, cache: ResponseCache) -> None:
        self.triton = admin
        self.transport = transport
        self.cache = cache
        self.draining = False

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, report). Redis down is ``degraded``, not a failure: the sync path serves without it."""
        admin_live, transport_live, redis_ok = await asyncio.gather(
            self.triton.server_live(), self._transport_live(), self.cache.probe()
        )
        live = admin_live and transport_live  # Triton counts as live when every endpoint we use answers
        checks: dict[str, Any] = {"triton": {"status": "ok" if live else "fail"}}
        endpoint_states = getattr(self.triton, "endpoint_states", None)  # app.clients.routed
        if endpoint_states is not None and getattr(self.triton, "many", False):  # many Tritons: each one's
            checks["triton"]["endpoints"] = endpoint_states()
        ready = live and not self.draining
        if live:
            try:
                models = summarize_index(await self.triton.repository_index())
            except Exception as exc:
                checks["models"] = {"status": "fail", "error": str(exc)}
                ready = False
            else:
                not_ready = {m["name"]: m["state"] for m in models if m["state"] != "READY"}
                checks["models"] = {
                    "status": "fail" if not_ready or not models else "ok",
                    "ready": sorted(m["name"] for m in models if m["state"] == "READY"),
                    "not_ready": not_ready,
                }
                ready = ready and not not_ready and bool(models)
        else:
            checks["triton"]["error"] = "Triton is not reachable or not live"
            checks["models"] = {"status": "unknown"}
        if self.cache.enabled:
            checks["redis"] = {"status": "ok" if redis_ok else "degraded"}
            if not redis_ok:
                checks["redis"]["error"] = self.cache.last_error or "PING failed"
        else:
            checks["redis"] = {"status": "disabled"}
        if self.draining:
            checks["gateway"] = {"status": "draining"}
        return ready, checks

    async def _transport_live(self) -> bool:
        if self.transport is self.triton:
            return True  # inference over the admin channels: already checked
        return await self.transport.live()
