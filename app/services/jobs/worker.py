"""The job worker: reads the request streams through the consumer group ``tgw-workers`` (high priority
first), runs each job through the same ``InferenceService`` as the sync path, stores the result, acks.

At-least-once: an entry is acked only after its job is finished in the store. A worker that dies leaves
its entries pending; any worker's reclaimer takes them over with XAUTOCLAIM once idle for
``TGW_JOB_CLAIM_IDLE_S`` (a live worker keeps its running entries fresh with a JUSTID XCLAIM heartbeat).
Client-visible exactly-once comes from the store's finish script, which completes a job only once.

A job store that goes away mid-job (a Redis restart) does not cost the job in hand: each store step is
retried with backoff for up to ``TGW_JOB_STORE_RETRY_S``, so the answer already computed is stored when
Redis is back instead of the job waiting for a reclaim and running again. Every attempt is bounded as a
whole (``attempt_timeout_s``): a stuck attempt is abandoned, its heartbeat stops, and the entry is
reclaimed like a dead worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson

from app.domain import JobSpec, json_values
from app.errors import GatewayError, InvalidInput
from app.observability import metrics
from app.observability.requests import Requests
from app.request_context import RequestContext
from app.services.inference import InferenceService, InferRequest
from app.services.jobs.service import error_json, result_json
from app.services.jobs.store import (
    STORE_ERRORS,
    STORE_UNAVAILABLE,
    STREAMS,
    TERMINAL,
    Job,
    JobStatus,
    JobStore,
    decode_inputs,
)
from app.services.offload import INLINE, Offload
from app.tasks import stop_task

logger = logging.getLogger(__name__)
T = TypeVar("T")


def consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Retryable(Exception):
    pass


def client_error(exc: GatewayError) -> bool:
    """The request itself is wrong, so retrying cannot help: any 4xx, and Triton's invalid-argument
    rejections however the transport reported them (gRPC INVALID_ARGUMENT, HTTP 400)."""
    if exc.status_code < 500:
        return True
    return exc.details.get("grpc_status") == "INVALID_ARGUMENT" or exc.details.get("http_status") == 400


class JobWorker:
    def __init__(
        self,
        store: JobStore,
        inference: InferenceService,
        concurrency: int,
        claim_idle_s: float,
        max_attempts: int,
        name: str | None = None,
        store_retry_s: float = 30.0,
        attempt_timeout_s: float = 300.0,
        offload: Offload = INLINE,
        requests: Requests | None = None,
    ) -> None:
        self.store = store
        self.requests = requests or Requests()  # each attempt's metrics and access-log line
        self.offload = offload  # large results written in a child process
        self.store_retry_s = store_retry_s
        self.attempt_timeout_s = attempt_timeout_s
        self.inference = inference
        self.concurrency = concurrency
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.max_attempts = max_attempts
        self.name = name or consumer_name()
        self._active: dict[str, asyncio.Task[None]] = {}
        self._freed = asyncio.Event()
        self.stopping = False

    async def run(self) -> None:
        logger.info("job worker %s: concurrency %d", self.name, self.concurrency)
        reclaimer = asyncio.create_task(self._reclaim_loop(), name="job-reclaim")
        backoff = 0.2
        try:
            await self._retrying(self.store.ensure_groups)
            while not self.stopping:
                free = self.concurrency - len(self._active)
                if free <= 0:
                    self._freed.clear()
                    await self._freed.wait()
                    continue
                try:
                    entries = await self.store.read(self.name, free, block_ms=1000)
                    backoff = 0.2
                except (asyncio.CancelledError, KeyboardInterrupt):
                    raise
                except Exception as exc:
                    if "NOGROUP" in str(exc):
                        await self._retrying(self.store.ensure_groups)
                        continue
                    logger.warning("job worker: reading the stream failed (%s); retrying", exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
                for stream, entry_id, job_id in entries:
                    self._spawn(stream, entry_id, job_id)
        finally:
            await stop_task(reclaimer)

    async def _retrying(self, fn: Any) -> None:
        delay = 0.2
        while True:
            try:
                await fn()
                return
            except Exception as exc:
                logger.warning("job worker: Redis not ready (%s)", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _spawn(self, stream: str, entry_id: str, job_id: str) -> None:
        if entry_id in self._active:
            return
        task = asyncio.create_task(self._process(stream, entry_id, job_id), name=f"job-{job_id}")
        self._active[entry_id] = task

        def done(_: asyncio.Task[None]) -> None:
            self._active.pop(entry_id, None)
            self._freed.set()

        task.add_done_callback(done)

    async def _reclaim_loop(self) -> None:
        interval = max(0.2, self.claim_idle_ms / 2000)
        while True:
            await asyncio.sleep(interval)
            for stream in STREAMS.values():
                free = self.concurrency - len(self._active)
                if free <= 0 or self.stopping:
                    break
                try:
                    claimed = await self.store.reclaim(stream, self.name, self.claim_idle_ms, free)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    logger.debug("reclaim on %s failed: %s", stream, exc)
                    continue
                for entry_id, job_id in claimed:
                    logger.info("reclaimed %s from an idle consumer", entry_id)
                    self._spawn(stream, entry_id, job_id)

    async def _heartbeat(self, stream: str, entry_id: str) -> None:
        while True:
            await asyncio.sleep(max(0.1, self.claim_idle_ms / 3000))
            with contextlib.suppress(Exception):
                await self.store.keep_claimed(stream, self.name, entry_id)

    async def _process(self, stream: str, entry_id: str, job_id: str) -> None:
        heartbeat = asyncio.create_task(self._heartbeat(stream, entry_id))
        bound = asyncio.timeout(self.attempt_timeout_s)
        try:
            async with bound:
                await self._run_job(job_id)
                await self._stored(lambda: self.store.ack(stream, entry_id))
        except Retryable:
            return  # left pending: reclaimed after the idle timeout, then counted as another attempt
        except TimeoutError:
            if bound.expired():
                logger.warning("job %s: attempt unfinished after %.0f s; abandoned, it will be reclaimed",
                               job_id, self.attempt_timeout_s)  # fmt: skip
            else:
                logger.exception("job %s: unexpected failure; it will be retried", job_id)
        except STORE_ERRORS as exc:  # the store stayed away: the entry stays pending
            logger.warning("job %s: the job store failed (%s); it will be retried", job_id, exc)
        except Exception:
            logger.exception("job %s: unexpected failure; it will be retried", job_id)
        finally:
            heartbeat.cancel()

    async def _stored(self, step: Callable[[], Awaitable[T]]) -> T:
        """One job-store step, retried while Redis is unreachable or restarting (connection refused or
        reset, loading, timeout) for up to ``store_retry_s``. Every step is safe to repeat: the scripts
        complete a job once, an ack of an acked entry is a no-op."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.store_retry_s
        delay = 0.1
        while True:
            try:
                return await step()
            except STORE_UNAVAILABLE as exc:
                if loop.time() + delay > deadline:
                    raise
                logger.info("job store unavailable (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def _run_job(self, job_id: str) -> None:
        status, attempt = await self._stored(lambda: self.store.start(job_id, self.max_attempts))
        if status in TERMINAL or status == "gone":
            return  # cancelled, expired, or already completed by another worker
        if status == "exhausted":
            gone = await self._stored(lambda: self.store.get(job_id))
            last = gone.last_error if gone is not None and gone.last_error else b""
            await self._give_up(job_id, attempt, last.decode())
            return
        job = await self._stored(lambda: self.store.get(job_id))
        if job is None:
            return
        metrics.record_job("running")
        path = f"/v1/models/{job.model}" + (f"/versions/{job.version}" if job.version else "") + "/jobs"
        served = self.requests.begin("job", "JOB", path, job.request_id or "")  # the services fill it in
        answered = 500
        try:
            req, ctx = await self._request(job)
            served.request_id = ctx.request_id
            response = await self.inference.infer(req, ctx)
            answered = 200
        except GatewayError as exc:
            answered = exc.status_code
            err = error_json(exc.code, exc.message, exc.details)
            if client_error(exc):  # the request itself is wrong: retrying cannot help
                if await self._stored(lambda: self.store.finish(job_id, JobStatus.FAILED, error=err)):
                    metrics.record_job("failed")
                return
            await self._failed_attempt(job_id, attempt, err)
        except Exception as exc:
            await self._failed_attempt(job_id, attempt, error_json("internal_error", f"{type(exc).__name__}"))
        else:
            result = await self.offload.encode(json_values(response.result.outputs), result_json, response)
            done = await self._stored(
                lambda: self.store.finish(job_id, JobStatus.SUCCEEDED, result=result, cache=response.cache)
            )
            if done:
                metrics.record_job("succeeded")
            else:
                logger.info("job %s was already finished; result discarded", job_id)
        finally:
            served.end(answered)

    async def _request(self, job: Job) -> tuple[InferRequest, RequestContext]:
        """The request as validated at submit: the stored tensors (bytes, dtype, shape) and ``JobSpec``
        (what the submission's context decided is in it), and the run's context: the submission's id."""
        blob = await self._stored(lambda: self.store.inputs(job.id))
        if blob is None:
            raise InvalidInput("the job's inputs are gone (expired)", {"job_id": job.id})
        inputs, datatypes = decode_inputs(blob)
        info = await self.inference.resolve(job.model, job.version)
        changed = [n for n in inputs if n not in info.inputs or info.inputs[n].datatype != datatypes[n]]
        if changed:
            raise InvalidInput(
                f"{changed[0]}: the model's inputs changed since the job was submitted", {"field": changed[0]}
            )
        ctx = RequestContext.open("job", job.request_id or None)
        return JobSpec.from_record(job.spec).request(info, inputs, ctx.request_id), ctx

    async def _failed_attempt(self, job_id: str, attempt: int, err: bytes) -> None:
        await self._stored(lambda: self.store.set_last_error(job_id, err))
        if attempt >= self.max_attempts:
            await self._give_up(job_id, attempt, err.decode())
            return
        logger.info("job %s attempt %d failed; it will be retried", job_id, attempt)
        raise Retryable

    async def _give_up(self, job_id: str, attempts: int, last_error: str) -> None:
        """Dead-letter the job. Its error has the last attempt's code (what any other door answers for
        the same failure, e.g. ``triton_timeout``), or ``attempts_exhausted`` when no attempt ended with
        an error (its workers kept dying); the details say it was given up."""
        last = orjson.loads(last_error) if last_error else None
        reason = f"gave up after {attempts} attempts (TGW_JOB_MAX_ATTEMPTS)"
        if last:
            reason += f": {last.get('message', '')}"
        await self._stored(lambda: self.store.dead_letter(job_id, reason, attempts))
        details = {"attempts": attempts, "last_error": last, "dead_letter": True, "attempts_exhausted": True}
        code = last.get("code") if isinstance(last, dict) and isinstance(last.get("code"), str) else None
        err = error_json(code or "attempts_exhausted", reason, details)
        if await self._stored(lambda: self.store.finish(job_id, JobStatus.FAILED, error=err)):
            metrics.record_job("failed")

    async def drain(self, timeout_s: float) -> None:
        """Stop taking new entries and give running jobs ``timeout_s`` to finish."""
        self.stopping = True
        self._freed.set()
        if self._active:
            await asyncio.wait(list(self._active.values()), timeout=timeout_s)
