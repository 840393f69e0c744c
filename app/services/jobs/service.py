"""The job service: submit (validated like infer; idempotency, backpressure, cache hit), get, cancel."""

from __future__ import annotations

import hashlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

import orjson

from app.codecs import v1
from app.errors import Conflict, InvalidInput, NotFound, ServiceUnavailable
from app.observability import metrics
from app.services.inference import InferenceService, InferResponse
from app.services.jobs.ssrf import UnsafeURL, vet_url
from app.services.jobs.store import JobStore, idem_key, new_job_id

logger = logging.getLogger(__name__)

PRIORITIES = ("high", "normal")
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


def error_json(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps({"code": code, "message": message, "details": details or {}})


def result_json(response: InferResponse) -> bytes:
    return orjson.dumps(v1.result(response), option=_JSON_OPTS)


def _iso(ts: str | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(float(ts), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JobService:
    def __init__(
        self,
        store: JobStore,
        inference: InferenceService,
        queue_max: int,
        retry_after_s: int,
        webhook_allow_private: bool,
    ) -> None:
        self.store = store
        self.inference = inference
        self.queue_max = queue_max
        self.retry_after_s = retry_after_s
        self.webhook_allow_private = webhook_allow_private
        self.websockets_open = 0  # maintained by the WebSocket routers of this replica

    async def submit(
        self, model: str, version: str | None, body: Any, idempotency_key: str | None, request_id: str
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise InvalidInput("body: expected a JSON object with an 'inputs' object", {"field": "body"})
        infer_body = {k: v for k, v in body.items() if k not in ("webhook", "priority")}
        req = v1.decode_body(await self.inference.resolve(model, version), infer_body)
        priority = body.get("priority", "normal")
        if priority not in PRIORITIES:
            raise InvalidInput(f"priority: expected one of {', '.join(PRIORITIES)}", {"field": "priority"})
        webhook_url = await self._vet_webhook(body.get("webhook"))

        job_id = new_job_id()
        if idempotency_key is not None:
            if not 1 <= len(idempotency_key) <= 255:
                raise InvalidInput(
                    "Idempotency-Key: expected 1 to 255 characters", {"field": "Idempotency-Key"}
                )
            fingerprint = hashlib.sha256(
                orjson.dumps([model, version, body], option=orjson.OPT_SORT_KEYS)
            ).hexdigest()
            held = await self.store.claim_idempotency(idempotency_key, fingerprint, job_id)
            if held is not None:
                if held[0] != fingerprint:
                    raise InvalidInput(
                        "Idempotency-Key was already used with a different request body",
                        {"field": "Idempotency-Key", "conflict": "body", "job_id": held[1]},
                    )
                status = await self.store.status(held[1]) or "queued"
                return {"id": held[1], "status": status, "replayed": True}

        fields = {
            "id": job_id, "status": "queued", "model": model, "version": version or "",
            "request": orjson.dumps(infer_body).decode(), "priority": priority,
            "created_at": str(time.time()), "attempts": "0", "webhook_url": webhook_url or "",
            "request_id": request_id,
        }  # fmt: skip
        hit = await self.inference.cached(req)
        try:
            if hit is not None:
                await self.store.create_finished(job_id, fields, result_json(hit), hit.cache)
                metrics.record_job("succeeded")
                return {"id": job_id, "status": "succeeded", "replayed": False}
            if await self.store.queue_depth() >= self.queue_max:
                raise ServiceUnavailable(
                    f"the job queue is full ({self.queue_max} pending, TGW_QUEUE_MAX); retry later",
                    {"queue_max": self.queue_max}, retry_after_s=self.retry_after_s,
                )  # fmt: skip
            await self.store.create_queued(job_id, fields, priority)
            metrics.record_job("queued")
        except BaseException:
            if idempotency_key is not None:  # let the client's retry start afresh
                await self.store.redis.delete(idem_key(idempotency_key))
            raise
        logger.info("job %s queued for %s (priority %s)", job_id, model, priority)
        return {"id": job_id, "status": "queued", "replayed": False}

    async def _vet_webhook(self, webhook: Any) -> str | None:
        if webhook is None:
            return None
        if not isinstance(webhook, dict) or set(webhook) - {"url"} or "url" not in webhook:
            raise InvalidInput('webhook: expected {"url": "https://..."}', {"field": "webhook"})
        url = webhook["url"]
        try:
            await vet_url(url, self.webhook_allow_private)
        except UnsafeURL as exc:
            raise InvalidInput(f"webhook.url: {exc}", {"field": "webhook.url", "reason": str(exc)}) from None
        return str(url)

    async def get(self, job_id: str) -> dict[str, Any]:
        raw = await self.store.get(job_id)
        if raw is None:
            raise NotFound(f"no job {job_id!r} (unknown or expired)", {"job_id": job_id})
        return await self.view(raw)

    async def view(self, raw: dict[str, str]) -> dict[str, Any]:
        job_id = raw["id"]
        out: dict[str, Any] = {
            "id": job_id,
            "status": raw.get("status"),
            "model": raw.get("model"),
            "version": raw.get("version") or None,
            "priority": raw.get("priority", "normal"),
            "created_at": _iso(raw.get("created_at")),
            "started_at": _iso(raw.get("started_at")),
            "finished_at": _iso(raw.get("finished_at")),
            "attempts": int(raw.get("attempts") or 0),
        }
        if "result" in raw:
            out["result"] = orjson.loads(raw["result"])
            out["cache"] = raw.get("cache")
        if "error" in raw:
            out["error"] = orjson.loads(raw["error"])
        if raw.get("webhook_url"):
            out["webhook"] = {
                "url": raw["webhook_url"],
                "id": f"msg_{job_id}",
                "status": raw.get("webhook_status", "waiting"),
                "attempts": await self.store.deliveries(job_id),
            }
        return out

    async def cancel(self, job_id: str) -> dict[str, Any]:
        cancelled, outcome = await self.store.cancel(job_id)
        if outcome == "gone":
            raise NotFound(f"no job {job_id!r} (unknown or expired)", {"job_id": job_id})
        if not cancelled:
            raise Conflict(
                f"job {job_id} is {outcome}; only queued jobs can be cancelled",
                {"job_id": job_id, "status": outcome},
            )
        metrics.record_job("cancelled")
        return await self.get(job_id)

    async def stats(self) -> dict[str, Any]:
        """Numbers for autoscaling and the metrics helper: queue depth, oldest pending age, counts by
        status (cluster-wide, from Redis) and this replica's open WebSockets."""
        stats = await self.store.stats()
        stats["websockets_open"] = self.websockets_open
        return stats
