"""The job service: submit (validated like infer; idempotency, backpressure, cache hit), get (with the
webhook delivery log), cancel, watch. Every operation takes the ``owner`` (the tenant; "" without
authentication): another owner's job is answered exactly as a job that does not exist, and idempotency
keys are per owner."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import orjson

from app.domain import InferRequest, InferResponse, JobSpec, ModelInfo, json_values
from app.errors import Conflict, GatewayError, InvalidInput, NotFound, ServiceUnavailable
from app.observability import metrics
from app.observability.context import annotate
from app.request_context import RequestContext
from app.services.inference import InferenceService
from app.services.jobs.events import EventHub
from app.services.jobs.ssrf import UnsafeURL, vet_url
from app.services.jobs.store import (
    Job,
    JobStatus,
    JobStore,
    encode_inputs,
    new_job_id,
    redis_errors,
    valid_job_id,
)
from app.services.offload import INLINE, Offload
from app.services.payload import parse_json
from app.services.validation import container_budget, validate_v1_body, value_budget
from app.timestamps import iso_utc

logger = logging.getLogger(__name__)

PRIORITIES = ("high", "normal")
WEBHOOK_EVENTS = ("progress",)  # what a submission's ``webhook.events`` may ask for besides the final one
_JSON_OPTS = orjson.OPT_SERIALIZE_NUMPY
WATCH_POLL_S = 15.0  # events wake watchers at once; this re-read of the store is only the safety net

Emit = Callable[[dict[str, Any]], None]


def error_json(code: str, message: str, details: dict[str, Any] | None = None) -> bytes:
    return orjson.dumps({"code": code, "message": message, "details": details or {}})


def result_json(response: InferResponse) -> bytes:
    return orjson.dumps(response.public(), option=_JSON_OPTS)


_iso = iso_utc


@dataclass(slots=True)
class PreparedJob:
    """A job body parsed and decoded for its model (``prepare_job``): only what ``submit`` reads, never the
    body's own lists (which would cross back from a child process as millions of Python objects)."""

    webhook: Any
    priority: Any
    fingerprint: str  # of the body as sent (with model and version): the idempotency check
    request: InferRequest | None
    error: GatewayError | None  # what decoding raised: answered by ``submit`` after its own checks


def prepare_job(raw: bytes, info: ModelInfo, model: str, version: str | None) -> PreparedJob:
    """Parse a job body (within the bounds of the model's tensors: ``app.services.payload``) and decode it
    for ``info``. Runs in a child process for a large body (``app.services.offload``)."""
    body = parse_json(raw, max_values=value_budget(info), containers=container_budget(info), what="job")
    if not isinstance(body, dict):
        raise InvalidInput("body: expected a JSON object with an 'inputs' object", {"field": "body"})
    try:
        request = validate_v1_body(info, {k: v for k, v in body.items() if k not in ("webhook", "priority")})
    except GatewayError as exc:
        return PreparedJob(body.get("webhook"), body.get("priority", "normal"), "", None, exc)
    fingerprint = hashlib.sha256(
        orjson.dumps([model, version, body], option=orjson.OPT_SORT_KEYS)
    ).hexdigest()
    return PreparedJob(body.get("webhook"), body.get("priority", "normal"), fingerprint, request, None)


def _not_found(job_id: str) -> NotFound:
    return NotFound(f"no job {job_id!r} (unknown or expired)", {"job_id": job_id})


@dataclass(frozen=True, slots=True)
class SubmitResult:
    id: str
    status: JobStatus
    replayed: bool


class JobService:
    def __init__(
        self,
        store: JobStore,
        inference: InferenceService,
        queue_max: int,
        retry_after_s: int,
        webhook_allow_private: bool,
        webhook_allowed_ports: frozenset[int] = frozenset(),
        hub: EventHub | None = None,
        max_body_bytes: int = 4 * 1024 * 1024,
        offload: Offload = INLINE,
    ) -> None:
        self.store = store
        self.inference = inference
        self.queue_max = queue_max
        self.retry_after_s = retry_after_s
        self.webhook_allow_private = webhook_allow_private
        self.webhook_allowed_ports = webhook_allowed_ports
        self.hub = hub
        self.max_body_bytes = max_body_bytes  # TGW_JOB_MAX_BODY_BYTES: the router reads at most this
        self.offload = offload  # large bodies decoded, large results written, in child processes
        self.websockets_open = 0  # this replica's open job/multiplexed sockets

    async def submit(
        self, owner: str, model: str, version: str | None, body: PreparedJob, idempotency_key: str | None,
        ctx: RequestContext,
    ) -> SubmitResult:  # fmt: skip
        """``body``: the submission as ``prepare_job`` decoded it for the model (the door resolved it; a
        decoupled model's job is run as a stream by the worker);
        ``ctx``: the submission's context (its id, its key, its cache
        directives), applied to the request here and carried with the job to the worker (``JobSpec``)."""
        if idempotency_key is not None and not 1 <= len(idempotency_key) <= 255:
            raise InvalidInput("Idempotency-Key: expected 1 to 255 characters", {"field": "Idempotency-Key"})
        if body.error is not None:
            raise body.error
        req = body.request
        assert req is not None
        self.inference.bind(req, ctx)  # the key's tier, the cache directives: they ride with the job
        priority = body.priority
        if priority not in PRIORITIES:
            raise InvalidInput(f"priority: expected one of {', '.join(PRIORITIES)}", {"field": "priority"})
        webhook_url, progress = await self._vet_webhook(body.webhook)
        fingerprint = body.fingerprint
        key_id = (
            ctx.caller.key_id if ctx.caller is not None else ""
        )  # usage: its attempts are metered under it
        record = replace(JobSpec.of(req), key_id=key_id).to_record()
        if version is None and ctx.traffic is not None:  # the version the model's traffic policy chose
            version = ctx.traffic.version  # runs it, whatever the policy says when the job runs
        job = Job(
            id=new_job_id(), owner=owner, status=JobStatus.QUEUED, model=model, version=version,
            priority=priority, created_at=time.time(), request_id=ctx.request_id, spec=record,
            webhook_url=webhook_url, webhook_progress=progress,
        )  # fmt: skip
        # a decoupled model's job is answered by its worker (which replays a completed stream cached): its
        # submission looks nothing up (its line says so, with the model, as a submission that skips the read)
        if req.info.decoupled:
            annotate(req.info.name, req.info.version, "BYPASS")
        hit = None if req.info.decoupled else await self.inference.cached(req, ctx)
        if hit is not None:
            result = await self.offload.encode(json_values(hit.result.outputs), result_json, hit)
            job.status, job.result, job.cache, job.finished_at = (
                JobStatus.SUCCEEDED, result, hit.cache, time.time(),
            )  # fmt: skip
        inputs = b"" if hit is not None else encode_inputs(req.inputs, req.datatypes)
        idem = (owner, idempotency_key) if idempotency_key is not None else None
        with redis_errors(self.retry_after_s):
            done = await self.store.submit(job, inputs, idem, fingerprint, self.queue_max)
        if done.outcome == "conflict":  # never name the job the key is bound to
            raise InvalidInput(
                "Idempotency-Key was already used with a different request body",
                {"field": "Idempotency-Key", "conflict": "body"},
            )
        if done.outcome == "full":
            raise ServiceUnavailable(
                f"the job queue is full ({self.queue_max} pending, TGW_QUEUE_MAX); retry later",
                {"queue_max": self.queue_max}, retry_after_s=self.retry_after_s,
            )  # fmt: skip
        assert done.status is not None
        if done.outcome == "replay":
            return SubmitResult(done.job_id, done.status, True)
        metrics.record_job(str(job.status))
        logger.info("job %s %s for %s (priority %s)", job.id, job.status, model, priority)
        return SubmitResult(done.job_id, done.status, False)

    async def _vet_webhook(self, webhook: Any) -> tuple[str | None, bool]:
        """The webhook's URL (vetted) and whether ``job.progress`` deliveries were asked for."""
        if webhook is None:
            return None, False
        if not isinstance(webhook, dict) or set(webhook) - {"url", "events"} or "url" not in webhook:
            raise InvalidInput(
                'webhook: expected {"url": "https://..."} (and optionally "events": ["progress"])',
                {"field": "webhook"},
            )
        events = webhook.get("events", [])
        if not isinstance(events, list) or any(e not in WEBHOOK_EVENTS for e in events):
            raise InvalidInput(
                f"webhook.events: expected a list of {', '.join(WEBHOOK_EVENTS)} (the final result is always "
                "delivered)",
                {"field": "webhook.events"},
            )
        url = webhook["url"]
        try:
            await vet_url(url, self.webhook_allow_private, self.webhook_allowed_ports)
        except UnsafeURL as exc:
            raise InvalidInput(f"webhook.url: {exc}", {"field": "webhook.url", "reason": str(exc)}) from None
        return str(url), "progress" in events

    async def find(self, owner: str, job_id: str) -> Job | None:
        """The job if it exists and belongs to ``owner``; None otherwise (the two are not told apart)."""
        if not valid_job_id(job_id):
            return None
        with redis_errors(self.retry_after_s):
            job = await self.store.get(job_id)
        if job is None or job.owner != owner:
            return None
        return job

    async def get(self, owner: str, job_id: str) -> dict[str, Any]:
        job = await self.find(owner, job_id)
        if job is None:
            raise _not_found(job_id)
        return await self.view(job)

    async def view(self, job: Job) -> dict[str, Any]:
        """The job as ``GET /v1/jobs/{id}`` shows it (also the webhook payload's ``data``)."""
        out: dict[str, Any] = {
            "id": job.id,
            "status": str(job.status),
            "model": job.model,
            "version": job.version,
            "priority": job.priority,
            "created_at": _iso(job.created_at),
            "started_at": _iso(job.started_at),
            "finished_at": _iso(job.finished_at),
            "attempts": job.attempts,
        }
        if job.result is not None:  # written into the answer as stored: never parsed, however large
            out["result"] = orjson.Fragment(job.result)
            out["cache"] = job.cache
        if job.error is not None:
            out["error"] = orjson.loads(job.error)
        if job.webhook_url:
            with redis_errors(self.retry_after_s):
                attempts = await self.store.deliveries(job.id)
            out["webhook"] = {
                "url": job.webhook_url,
                "id": f"msg_{job.id}",
                "status": job.webhook_status or "waiting",
                "attempts": [
                    {**a, "at": _iso(a.get("at")), "next_attempt_at": _iso(a.get("next_attempt_at"))}
                    for a in attempts
                ],
            }
        return out

    async def cancel(self, owner: str, job_id: str) -> dict[str, Any]:
        """Cancel a queued or running job: it is ``cancelled`` at once (never retried, no result); the
        worker running it notices (the job's event, or its own check of the store) and cancels its
        request in Triton."""
        job = await self.find(owner, job_id)
        if job is None:
            raise _not_found(job_id)
        with redis_errors(self.retry_after_s):
            cancelled = await self.store.finish(job_id, JobStatus.CANCELLED)
        if not cancelled:
            now = await self.find(owner, job_id)
            if now is None:
                raise _not_found(job_id)
            raise Conflict(
                f"job {job_id} is {now.status}; only queued or running jobs can be cancelled",
                {"job_id": job_id, "status": str(now.status)},
            )
        metrics.record_job("cancelled")
        return await self.get(owner, job_id)

    async def watch(self, owner: str, job_id: str, emit: Emit) -> bool:
        """Emit status changes, a running job's partial results (``{"type": "partial", "seq", "result"}``, as
        its worker publishes them: a decoupled model's responses), then the final job; False when the job
        does not exist (for this owner). Woken by the process's one event subscription; re-reads the
        store only every ``WATCH_POLL_S`` otherwise (pub/sub is at-most-once)."""
        wake = asyncio.Event()
        last: JobStatus | None = None
        ended = False

        def partials(_job_id: str, items: list[Any]) -> None:
            nonlocal last
            if ended or not found:
                return  # not this owner's job (yet) or already answered: nothing leaks, nothing after
            if last != JobStatus.RUNNING:  # the status change comes first, whatever the re-read's pace
                emit({"type": "status", "job_id": job_id, "status": str(JobStatus.RUNNING)})
                last = JobStatus.RUNNING
            for item in items:
                if isinstance(item, dict):
                    emit({"type": "partial", "job_id": job_id, "seq": item.get("seq"),
                          "attempt": item.get("attempt"), "result": item.get("result")})  # fmt: skip

        found = False
        hub = self.hub
        unsubscribe = hub.subscribe(job_id, lambda _j, _s: wake.set()) if hub else (lambda: None)
        unsubscribe_partials = hub.subscribe_partials(job_id, partials) if hub else (lambda: None)
        try:
            while True:
                wake.clear()
                try:
                    job = await self.find(owner, job_id)
                except ServiceUnavailable as exc:
                    emit({"type": "error", "job_id": job_id, "error": {
                        "code": exc.code, "message": exc.message, "details": exc.details}})  # fmt: skip
                    await asyncio.sleep(self.retry_after_s)
                    continue
                if job is None:
                    ended = True
                    missing = {"code": "not_found", "message": f"no job {job_id!r}", "details": {}}
                    emit({"type": "error", "job_id": job_id, "error": missing})
                    return False
                found = True
                stale = job.status == JobStatus.QUEUED and last == JobStatus.RUNNING  # read before a partial
                if job.status != last and not stale:
                    emit({"type": "status", "job_id": job_id, "status": str(job.status)})
                    last = job.status
                if job.status.terminal:
                    ended = True
                    emit({"type": "result", "job_id": job_id, "job": await self.view(job)})
                    return True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WATCH_POLL_S * random.uniform(0.8, 1.2)):
                        await wake.wait()
        finally:
            unsubscribe()
            unsubscribe_partials()

    async def stats(self) -> dict[str, Any]:
        """Numbers for autoscaling and the metrics helper: queue depth, oldest pending age, counts by
        status (cluster-wide, from Redis) and this replica's open WebSockets."""
        with redis_errors(self.retry_after_s):
            stats = await self.store.stats()
        stats["websockets_open"] = self.websockets_open
        return stats
