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

A job on a decoupled model is run through ``InferenceService.open_stream``: each response is a partial
result, pushed to the job's subscribers as it comes (``Partials``: coalesced into one event per
``partial_interval_s``, never a write of the job record) and, when the job asked for them, to its
webhook as ``job.progress`` messages (at most one per ``progress_interval_s``); the stored result is the
whole sequence, bounded by ``stream_max_bytes``. A job cancelled while it runs (``DELETE``) is noticed
at once through its event (and by a check of the store every ``CANCEL_POLL_S``): its request is
cancelled in Triton (a stream's ``cancel("job")``; a unary call's task), nothing is stored, and the entry
is acked: never run again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import orjson

from app.domain import JobSpec, json_values
from app.errors import GatewayError, InvalidInput, PayloadTooLarge, UpstreamError
from app.observability import metrics
from app.observability.requests import Requests
from app.request_context import Caller, RequestContext
from app.services.inference import InferenceService, InferRequest
from app.services.jobs.events import EventHub
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
from app.services.streams import ResponseStream
from app.tasks import stop_task
from app.timestamps import iso_utc

logger = logging.getLogger(__name__)
T = TypeVar("T")
CANCEL_POLL_S = 1.0  # a running job's worker re-reads its status this often (its event is the fast path)
PARTIALS_PER_EVENT = 64  # a partials event carries at most this many: a subscriber's queue is not flooded


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


class Partials:
    """The partial results of one running decoupled job on their way out: to its subscribers (one pub/sub
    event per ``interval_s`` with every response since the last, at most ``PARTIALS_PER_EVENT`` each) and,
    when ``webhook`` is set, as ``job.progress`` webhook messages (one per ``webhook_interval_s`` at most,
    carrying the responses since the previous one). Failures to push are logged, never the job's:
    pushes are at most once (the job's stored result holds the whole sequence)."""

    def __init__(
        self, store: JobStore, job: Job, attempt: int, interval_s: float, webhook: bool,
        webhook_interval_s: float,
    ) -> None:  # fmt: skip
        self.store, self.job, self.attempt = store, job, attempt
        self.interval_s, self.webhook_interval_s = interval_s, webhook_interval_s
        self._pending: list[bytes] = []
        self._progress: list[bytes] | None = [] if webhook else None
        self._messages = 0
        self._last_progress = 0.0
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name=f"job-partials-{job.id}")

    def add(self, seq: int, result: bytes) -> None:
        item = b'{"seq":%d,"attempt":%d,"result":%s}' % (seq, self.attempt, result)
        self._pending.append(item)
        if self._progress is not None:
            self._progress.append(item)
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._publish()
            if self._progress and loop.time() - self._last_progress >= self.webhook_interval_s:
                self._last_progress = loop.time()
                await self._send_progress()
            await asyncio.sleep(self.interval_s)

    async def _publish(self) -> None:
        while self._pending:
            batch = self._pending[:PARTIALS_PER_EVENT]
            del self._pending[:PARTIALS_PER_EVENT]
            try:
                await whole(self.store.publish_partials(self.job.id, batch))
            except STORE_ERRORS as exc:
                logger.info("job %s: partial results not pushed (%s)", self.job.id, exc)

    async def _send_progress(self) -> None:
        items, self._progress = self._progress or [], []
        if not items:
            return
        self._messages += 1
        data = {
            "id": self.job.id, "status": "running", "model": self.job.model, "version": self.job.version,
            "partials": [orjson.Fragment(i) for i in items],
        }  # fmt: skip
        body = orjson.dumps({"type": "job.progress", "timestamp": iso_utc(time.time()), "data": data})
        try:
            await whole(self.store.add_progress(self.job.id, self._messages, body))
        except STORE_ERRORS as exc:
            logger.info("job %s: a progress webhook was not scheduled (%s)", self.job.id, exc)

    async def close(self, flush: bool) -> None:
        """Stop; ``flush``: push what is left first (the job completed: its partials precede its result)."""
        await stop_task(self._task)
        if flush:
            await self._publish()
            await self._send_progress()


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
        hub: EventHub | None = None,
        stream_max_bytes: int = 16 * 1024 * 1024,
        partial_interval_s: float = 0.02,
        progress_interval_s: float = 1.0,
    ) -> None:
        self.store = store
        self.hub = hub  # a running job's cancellation arrives as its event
        self.stream_max_bytes = stream_max_bytes
        self.partial_interval_s = partial_interval_s
        self.progress_interval_s = progress_interval_s
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
                await whole(self.store.keep_claimed(stream, self.name, entry_id))

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
        stop = asyncio.Event()  # set when the job is cancelled while it runs
        watcher = asyncio.create_task(self._watch_cancel(job_id, stop), name=f"job-cancel-{job_id}")
        try:
            req, ctx = await self._request(job)
            served.request_id = ctx.request_id
            if req.info.decoupled:
                outcome = await self._stream(job, attempt, req, ctx, stop)
            else:
                outcome = await self._unary(req, ctx, stop)
            if outcome is None:
                answered = 499  # the client (DELETE) cancelled it
                logger.info("job %s cancelled while running; its request was cancelled in Triton", job_id)
                return
            result, cache = outcome
            answered = 200
        except GatewayError as exc:
            answered = exc.status_code
            if stop.is_set():
                return  # cancelled meanwhile: whatever the cut-off request raised is no failure
            err = error_json(exc.code, exc.message, exc.details)
            if client_error(exc):  # the request itself is wrong: retrying cannot help
                if await self._stored(lambda: self.store.finish(job_id, JobStatus.FAILED, error=err)):
                    metrics.record_job("failed")
                return
            await self._failed_attempt(job_id, attempt, err)
        except Exception as exc:
            if stop.is_set():
                return
            await self._failed_attempt(job_id, attempt, error_json("internal_error", f"{type(exc).__name__}"))
        else:
            done = await self._stored(
                lambda: self.store.finish(job_id, JobStatus.SUCCEEDED, result=result, cache=cache)
            )
            if done:
                metrics.record_job("succeeded")
            else:
                logger.info("job %s was already finished; result discarded", job_id)
        finally:
            await stop_task(watcher)
            served.end(answered)

    async def _watch_cancel(self, job_id: str, stop: asyncio.Event) -> None:
        """Set ``stop`` once the job is cancelled in the store: at once on its event (the hub of this
        process), else when the status is next read (every ``CANCEL_POLL_S``: pub/sub is at most once)."""
        wake = asyncio.Event()

        def heard(_job_id: str, status: str) -> None:
            if status == JobStatus.CANCELLED:
                stop.set()
            wake.set()

        unsubscribe = self.hub.subscribe(job_id, heard) if self.hub is not None else (lambda: None)
        try:
            while not stop.is_set():  # the event first: a job that ends within CANCEL_POLL_S costs no read
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CANCEL_POLL_S):
                        await wake.wait()
                if stop.is_set():
                    return
                with contextlib.suppress(*STORE_ERRORS):
                    if await whole(self.store.status(job_id)) == JobStatus.CANCELLED:
                        stop.set()
                        return
        finally:
            unsubscribe()

    async def _unary(
        self, req: InferRequest, ctx: RequestContext, stop: asyncio.Event
    ) -> tuple[bytes, str] | None:
        """The answer (JSON, cache outcome), or None when the job was cancelled first: the call's task is
        cancelled (the transport cancels its request to Triton)."""
        call = asyncio.create_task(self.inference.infer(req, ctx))
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({call, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not call.done():
                call.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await call
        if call.cancelled() or (stop.is_set() and call.exception() is not None):
            return None
        response = call.result()
        result = await self.offload.encode(json_values(response.result.outputs), result_json, response)
        return result, response.cache

    async def _stream(
        self, job: Job, attempt: int, req: InferRequest, ctx: RequestContext, stop: asyncio.Event
    ) -> tuple[bytes, str] | None:
        """A decoupled model's job: every response pushed as a partial result as it comes; the result is
        ``{"model", "model_version", "responses": [{"outputs": ...}, ...]}`` (Triton's empty final
        response left out) once the final flag came; None when the job was cancelled first (the request
        is cancelled in Triton)."""
        stream = await self.inference.open_stream(req, ctx)
        partials = Partials(
            self.store, job, attempt, self.partial_interval_s, bool(job.webhook_url and job.webhook_progress),
            self.progress_interval_s,
        )  # fmt: skip
        canceller = asyncio.create_task(_cancel_on(stop, stream))
        parts: list[bytes] = []
        size = 0
        version = ""
        final = False
        try:
            async for response in stream:
                final = response.result.final
                if not response.result.outputs:
                    continue  # Triton's last response may carry nothing but the final flag
                body = result_json(response)
                size += len(body)
                if size > self.stream_max_bytes:
                    stream.cancel("job")
                    raise PayloadTooLarge(
                        f"the job's responses exceed {self.stream_max_bytes} bytes "
                        "(TGW_JOB_STREAM_MAX_BYTES); its request was cancelled in Triton",
                        {"limit_bytes": self.stream_max_bytes, "responses": len(parts),
                         "field": "result"},
                    )  # fmt: skip
                version = version or response.result.model_version
                parts.append(_outputs_of(body))
                partials.add(len(parts), body)
        finally:
            await stop_task(canceller)
            await stream.aclose()
            await partials.close(flush=final and not stop.is_set())
        if stop.is_set() or stream.end == "job":
            return None
        if not final:
            ended = "the model's stream ended without its final response"
            raise UpstreamError(ended, {"responses": len(parts)})
        head = orjson.dumps({"model": stream.model, "model_version": version})
        result = head[:-1] + b',"responses":[' + b",".join(parts) + b"]}"
        return result, stream.cache

    async def _request(self, job: Job) -> tuple[InferRequest, RequestContext]:
        """The request as validated at submit: the stored tensors (bytes, dtype, shape) and ``JobSpec``
        (what the submission's context decided is in it), and the run's context: the submission's id."""
        blob = await self._stored(lambda: self.store.inputs(job.id))
        if blob is None:
            raise InvalidInput("the job's inputs are gone (expired)", {"job_id": job.id})
        inputs, datatypes = decode_inputs(blob)
        info = await self.inference.resolve(job.model, job.version, stream=True)  # a decoupled one streams
        changed = [n for n in inputs if n not in info.inputs or info.inputs[n].datatype != datatypes[n]]
        if changed:
            raise InvalidInput(
                f"{changed[0]}: the model's inputs changed since the job was submitted", {"field": changed[0]}
            )
        ctx = RequestContext.open("job", job.request_id or None)
        spec = JobSpec.from_record(job.spec)
        req = spec.request(info, inputs, ctx.request_id)
        # the job's owner and key, for usage metering (the key decided the rest at submit: it is in the spec)
        ctx.caller = Caller(key_id=spec.key_id, tenant=job.owner, tier="", cache_scope=req.cache_scope)
        return req, ctx

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


async def whole(call: Awaitable[T]) -> T:
    """A Redis call of a task that may be cancelled (``stop_task``), run to its end all the same: a call cut
    off between its command and its reply can leave that reply on the pooled connection, to be read as the
    reply of the next command sent on it (seen: a job's finish script "returning" another job's status)."""
    task = asyncio.ensure_future(call)
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return await asyncio.shield(task)


async def _cancel_on(stop: asyncio.Event, stream: ResponseStream) -> None:
    await stop.wait()
    stream.cancel("job")


def _outputs_of(public: bytes) -> bytes:
    """``{"outputs": ...}`` of one response's ``InferResponse.public()`` JSON (``outputs``: its last key)."""
    at = public.index(b',"outputs":')
    return b"{" + public[at + 1 :]
