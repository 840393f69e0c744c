"""The inference service: answer an ``InferRequest`` from the cache, else forward it to Triton as a
``TritonCall`` (single-flight: identical concurrent misses share one call).

Every door resolves the model once (``resolve``), decodes its wire format into an ``InferRequest`` (its
codec) and calls ``infer(request, ctx)`` or ``stream(request, ctx)`` with the one ``RequestContext`` it
built for the call; what the context decides is applied here, once, for every door (``bind``): the
request id, the caller's key (priority, timeout bound, cache scope), the cache directives, the deadline,
and the decoupled rule (a model that may answer any number of times is refused on a unary call, 501,
before anything reaches Triton). The job workers and the ``/v1/ws`` socket use the same service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

from app.clients.protocols import InferenceTransport, TritonCall, TritonResult
from app.domain import CacheOutcome, InferRequest, InferResponse
from app.errors import GatewayError, NotOffered, UpstreamTimeout
from app.observability import metrics, tracing
from app.observability.context import add_timing, annotate, note_answer, note_usage
from app.request_context import RequestContext, Routed
from app.services.cache import CacheUnavailable, ReadPolicy, ResponseCache, cache_key
from app.services.registry import ModelInfo, ModelRegistry
from app.services.singleflight import SingleFlight
from app.services.statistics import ServedStatistics
from app.services.streams import ResponseStream, StreamLimits
from app.services.traffic import TrafficPolicies

logger = logging.getLogger(__name__)

KEY_OFF_LOOP_BYTES = 1 << 20  # inputs larger than this are hashed for their cache key off the loop


# What Triton answers a decoupled model's request on its unary HTTP infer route; the gateway's unary infer
# routes (/v1, /v2) answer it too (501), before anything reaches Triton. Such models are streamed: gRPC
# ModelStreamInfer, the generate extension and /v1 stream routes (SSE), /v1/ws frames, jobs.
DECOUPLED_REFUSAL = (
    "HTTP end point doesn't support models with decoupled transaction policy; use gRPC ModelStreamInfer"
)


def _large(req: InferRequest) -> bool:
    size = 0
    for arr in req.inputs.values():  # a plain loop: ~0.1 µs a request (a generator: ~0.4)
        size += arr.nbytes
    return size > KEY_OFF_LOOP_BYTES


def _rows_and_bytes(req: InferRequest) -> tuple[int, int]:
    """The request's rows (its batch dimension; 1 for a model without one) and input tensor bytes."""
    size = 0
    rows = 1
    for arr in req.inputs.values():
        size += arr.nbytes
        if req.info.max_batch_size > 0 and arr.ndim > 0:
            rows = int(arr.shape[0])
    return rows, size


def _out_bytes(result: TritonResult) -> int:
    size = 0
    for arr in result.outputs.values():
        size += arr.nbytes
    return size


def meter(req: InferRequest, ctx: RequestContext) -> None:
    """The request reached the service: it is metered (``app.services.usage``) when its door ends it."""
    caller = ctx.caller
    rows, size = _rows_and_bytes(req)
    if caller is not None:
        note_usage(ctx.door, caller.tenant, caller.key_id, rows, size)
    else:
        note_usage(ctx.door, "", "", rows, size)


def refuse_decoupled(info: ModelInfo) -> None:
    """501 for a decoupled model (any number of answers per request): only a stream can carry them."""
    if info.decoupled:
        raise NotOffered(DECOUPLED_REFUSAL, {"model": info.name, "reason": "decoupled"})


def _call_status(exc: BaseException) -> str:
    """The ``status`` label of a Triton call that raised ``exc``."""
    if isinstance(exc, GatewayError):
        return exc.code
    if isinstance(exc, GeneratorExit | asyncio.CancelledError):
        return "cancelled"  # the caller went away (a client that stopped reading its stream)
    return "error"


@contextlib.contextmanager
def _cache_lookup() -> Iterator[None]:
    """A Redis lookup's span, its ``tgw_cache_operation`` metric and the request's ``cache`` stage time."""
    start = time.perf_counter()
    try:
        with tracing.span("cache.get"):
            yield
    finally:
        elapsed = time.perf_counter() - start
        metrics.cache_operation("get", elapsed)
        add_timing("cache", elapsed)


class InferenceService:
    def __init__(
        self,
        transport: InferenceTransport,
        registry: ModelRegistry,
        cache: ResponseCache,
        namespace: str,
        timeout_s: float,
        read_policy: ReadPolicy | None = None,
        served: ServedStatistics | None = None,
        stream_limits: StreamLimits | None = None,
        traffic: TrafficPolicies | None = None,
    ) -> None:
        self.traffic = traffic or TrafficPolicies(None)  # the models' traffic policies (none: no Redis)
        self.stream_limits = stream_limits or StreamLimits()
        self.transport = transport
        self.served = served  # answers given without Triton, for the model statistics
        self.read_policy = read_policy or ReadPolicy(0.0)
        self.registry = registry
        self.cache = cache
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.flights: SingleFlight[TritonResult] = SingleFlight(metrics.SINGLEFLIGHT_WAITERS)
        self._writes: set[asyncio.Task[None]] = set()

    async def resolve(
        self, model: str, version: str | None, *, stream: bool = False, ctx: RequestContext | None = None
    ) -> ModelInfo:
        """The model version that will serve a request (every door calls this once, first, then decodes).
        A request that names no version gets the latest ready one, or the one its model's traffic policy
        chooses for it (``app.services.traffic``: weights, the caller when sticky), recorded in ``ctx``
        (``ctx.traffic``: counted, maybe shadowed, by ``infer``); one that names a version is never
        redirected. A unary call (``stream`` False) to a decoupled model, which may answer any number of
        times, is refused here (501), for every door, before its body is decoded and before anything
        reaches Triton."""
        if version is None and ctx is not None:
            policy = self.traffic.policies.get(model)  # the one lookup a model without a policy costs
            if policy is not None:
                routed = policy.route(await self.registry.ready_versions(model), ctx.caller)
                if routed is not None:
                    version, ctx.traffic = routed.version, routed
        info = await self.registry.resolve(model, version)
        if not stream:
            refuse_decoupled(info)
        return info

    def key_for(self, req: InferRequest) -> str:
        info = req.info
        outputs = req.outputs or list(info.outputs)
        namespace = f"{self.namespace}:t:{req.cache_scope}" if req.cache_scope else self.namespace
        parameters = req.parameters
        if req.classification:  # another answer (top-k classes): another key (no parameter has this name)
            parameters = {**parameters, "\x00classification": req.classification}
        return cache_key(namespace, info.name, info.version, outputs, parameters, req.inputs, req.datatypes)

    async def _key_off_loop(self, req: InferRequest) -> str:
        """``key_for`` of large inputs, in a worker thread: blake2b does not hold the interpreter lock while
        it hashes, and 16 MB took ~30 ms, the event loop's time."""
        return await asyncio.to_thread(self.key_for, req)

    def _use_cache(self, req: InferRequest) -> bool:
        return req.info.cache_enabled and self.cache.enabled and req.cacheable

    @staticmethod
    def bind(req: InferRequest, ctx: RequestContext) -> InferRequest:
        """What ``ctx`` decides about ``req``, the same for every door: the request id Triton and the logs
        get, the cache directives, and the caller's key: its tier's Triton priority and timeout bound
        (whatever the request asked for) and the cache scope."""
        req.request_id = ctx.request_id
        if not ctx.cache_read:
            req.cache_read = False
        if not ctx.cache_write:
            req.cache_write = False
        caller = ctx.caller
        if caller is not None:
            options = req.options
            if caller.priority or caller.max_timeout_s:
                bound_us = (
                    int(caller.max_timeout_s * 1_000_000) if caller.max_timeout_s else options.timeout_us
                )
                req.options = replace(
                    options, priority=caller.priority or options.priority, timeout_us=bound_us
                )
            req.cache_scope = caller.cache_scope
        return req

    async def cached(self, req: InferRequest, ctx: RequestContext | None = None) -> InferResponse | None:
        """The cached answer, if any, without calling Triton (job submission answers hits at once), for a
        request its context was already applied to (``bind``). Follows the same rules as ``infer``; a
        cache error counts as no answer."""
        info = req.info
        if not (self._use_cache(req) and req.cache_read):
            annotate(info.name, info.version, "BYPASS")
            return None
        try:
            key = self.key_for(req) if not _large(req) else await self._key_off_loop(req)
            hit = await self._cache_get(key)
        except CacheUnavailable:
            hit = None
        annotate(info.name, info.version, "HIT" if hit is not None else "MISS")
        if hit is None:
            return None
        if ctx is not None:  # answered at once (a job submission): metered as the door's request
            meter(req, ctx)
            note_answer(_out_bytes(hit), saved_s=hit.compute_s)
        return InferResponse(info.name, hit, "HIT")

    async def infer(self, req: InferRequest, ctx: RequestContext) -> InferResponse:
        """The answer to ``req``, from the cache or Triton, within the caller's deadline (``ctx.deadline``:
        past it, 504 ``triton_timeout``, rendered DEADLINE_EXCEEDED over gRPC)."""
        self.bind(req, ctx)
        meter(req, ctx)
        routed = ctx.traffic
        if routed is not None and routed.version == req.info.version:
            return await self._routed(req, ctx, routed)
        return await self._infer_within(req, ctx)

    async def _routed(self, req: InferRequest, ctx: RequestContext, routed: Routed) -> InferResponse:
        """A request whose version a traffic policy chose: counted for that version (its evidence), and
        when sampled its inputs go to the shadow version after its answer (never delaying or failing it)."""
        start = time.perf_counter()
        try:
            response = await self._infer_within(req, ctx)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.traffic.served(routed, False, time.perf_counter() - start, True)
            raise
        self.traffic.served(routed, True, time.perf_counter() - start, response.cache != "HIT")
        if routed.shadow is not None and not req.options.sequence:  # a sequence's steps: never half-replayed
            self.traffic.shadow(routed, self.call_for(req), response.result, self.transport.infer)
        return response

    async def _infer_within(self, req: InferRequest, ctx: RequestContext) -> InferResponse:
        """``_infer`` within the caller's deadline."""
        deadline = ctx.deadline
        if deadline is None:
            return await self._infer(req, None)
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                return await self._infer(req, deadline)
        except TimeoutError:
            raise UpstreamTimeout("deadline exceeded waiting for Triton", {"deadline": "caller"}) from None

    async def _infer(self, req: InferRequest, deadline: float | None) -> InferResponse:
        info = req.info
        use_cache = self._use_cache(req)
        key = self.key_for(req) if not _large(req) else await self._key_off_loop(req)
        outcome: CacheOutcome = "BYPASS"
        start_ns = time.perf_counter_ns()
        model = (info.name, info.version)
        remote = True  # look in Redis and store there (False: a cold model's unsampled key, ReadPolicy)
        if use_cache and req.cache_read:
            remote = self.read_policy.should_read(model, key)
            try:
                hit = await self._cache_get(key, remote)
            except CacheUnavailable:
                use_cache = False
                metrics.cache_outcome("error")
            else:
                if remote:
                    self.read_policy.record(model, hit is not None)
                if hit is not None:
                    metrics.cache_outcome("hit")
                    annotate(info.name, info.version, "HIT")
                    if self.served is not None:
                        self.served.hit(info.name, info.version, time.perf_counter_ns() - start_ns)
                    note_answer(_out_bytes(hit), saved_s=hit.compute_s)
                    return InferResponse(info.name, hit, "HIT")
                outcome = "MISS"
                metrics.cache_outcome("miss" if remote else "skipped")
        else:
            metrics.cache_outcome("bypass")
        annotate(info.name, info.version, outcome)
        write = use_cache and req.cache_write and remote

        async def forward() -> TritonResult:
            result = await self._forward(req, deadline)
            if write:  # write-behind: the answer does not wait for Redis to acknowledge
                task = asyncio.create_task(self._store(key, req, result))
                self._writes.add(task)
                task.add_done_callback(self._writes.discard)
            return result

        if not req.cacheable:  # a sequence step is never shared with another request
            result = await forward()
            note_answer(_out_bytes(result), result.compute_s)
            return InferResponse(info.name, result, outcome)
        result, shared = await self.flights.do(key, forward)
        if shared:
            note_answer(_out_bytes(result), saved_s=result.compute_s, follower=True)
        else:
            note_answer(_out_bytes(result), result.compute_s)
        if shared:
            metrics.SINGLEFLIGHT_SHARED.inc()
            if self.served is not None:  # Triton saw the one call this request shared
                self.served.hit(info.name, info.version, time.perf_counter_ns() - start_ns)
        return InferResponse(info.name, result, outcome)

    def stream_key(self, req: InferRequest) -> str:
        """The cache key of ``req``'s whole stream (never a unary answer's: another parameter)."""
        return self.key_for(replace(req, parameters={**req.parameters, "\x00stream": 1}))

    async def open_stream(self, req: InferRequest, ctx: RequestContext) -> ResponseStream:
        """The responses of ``req`` (a decoupled model's request) as one ``ResponseStream``: replayed from
        the cache when a completed identical stream is stored there (``cache`` HIT), else from Triton
        (MISS, or BYPASS when the cache does not apply), never shared with another request. Like ``infer``,
        a model whose recent streams were rarely replayed skips the lookup (``ReadPolicy``). The stream's
        life is bounded by the caller's deadline and its tier's longest stream; leaving it early
        (``aclose``/``cancel``) cancels the request in Triton."""
        self.bind(req, ctx)
        meter(req, ctx)
        info = req.info
        limits = self.stream_limits
        caller = ctx.caller
        max_s = (caller.max_stream_s if caller is not None else None) or limits.max_duration_s
        use_cache = limits.cache_max_bytes > 0 and self._use_cache(req)
        key = ""
        outcome: CacheOutcome = "BYPASS"
        if use_cache:
            key = self.stream_key(req) if not _large(req) else await asyncio.to_thread(self.stream_key, req)
            model = (info.name, info.version)
            if not self.read_policy.should_write(model, key):
                use_cache = False  # few recent replays: an unsampled key is neither looked up nor stored
                outcome = "MISS" if req.cache_read else "BYPASS"
                if req.cache_read:
                    metrics.cache_outcome("skipped")
            elif req.cache_read:
                try:
                    replay = await self._cached_stream(key)
                except CacheUnavailable:
                    use_cache = False
                    metrics.cache_outcome("error")
                else:
                    self.read_policy.record(model, replay is not None)
                    if replay is not None:
                        metrics.cache_outcome("hit")
                        annotate(info.name, info.version, "HIT")
                        return ResponseStream(info.name, ctx, limits, "HIT", None, replay)
                    outcome = "MISS"
                    metrics.cache_outcome("miss")
        if outcome == "BYPASS":
            metrics.cache_outcome("bypass")
        annotate(info.name, info.version, outcome)
        # the caller's deadline bounds the stream's reads from Triton (UpstreamTimeout); the tier's longest
        # stream, when it comes first, is the pump's own bound (its ``duration`` error, not a deadline)
        call = replace(self.call_for(req), deadline=ctx.deadline or 0.0, max_batch_rows=0)
        store = None
        if use_cache and req.cache_write:
            cache_max = limits.cache_max_bytes

            async def store(results: list[TritonResult]) -> None:
                if all(r.model_version in ("", info.version) for r in results):
                    with contextlib.suppress(CacheUnavailable):
                        await self.cache.put_stream(key, results, cache_max)

        tier_first = ctx.deadline is None or ctx.deadline > time.monotonic() + max_s
        duration = max_s if tier_first else 0.0
        stream = ResponseStream(
            info.name, ctx, limits, outcome, self._relay(call), store=store, max_duration_s=duration
        )
        await asyncio.sleep(0)  # the pump's turn: the request is on its way to Triton while the door gets
        return stream  # ready to answer (~0.3 ms of the first response at c=1, measured)

    async def _cached_stream(self, key: str) -> list[TritonResult] | None:
        with _cache_lookup():
            return await self.cache.get_stream(key)

    async def _relay(self, call: TritonCall) -> AsyncIterator[TritonResult]:
        with self._triton_call("triton.stream", call):
            async for result in self.transport.stream(call):
                yield result

    async def stream(self, req: InferRequest, ctx: RequestContext) -> AsyncIterator[InferResponse]:
        """``open_stream`` as an async generator: every response of ``req``, the last with
        ``result.final`` set; closing it early cancels the request in Triton."""
        responses = await self.open_stream(req, ctx)
        try:
            async for response in responses:
                yield response
        finally:
            await responses.aclose()

    @contextlib.contextmanager
    def _triton_call(self, span: str, call: TritonCall) -> Iterator[None]:
        """A Triton call's span, its ``tgw_triton_request`` metric (status from what it raised) and its
        ``queue``/``triton`` stage timings."""
        start = time.perf_counter()
        status = "ok"
        try:
            with tracing.span(span, {"tgw.model": call.model, "tgw.model_version": call.version}):
                yield
        except BaseException as exc:
            status = _call_status(exc)
            raise
        finally:
            elapsed = time.perf_counter() - start
            metrics.triton_request(call.model, call.version, status, elapsed)
            add_timing("queue", call.queued_s)
            add_timing("triton", elapsed - call.queued_s)

    def call_for(self, req: InferRequest, deadline: float | None = None) -> TritonCall:
        """The Triton call of ``req``; its deadline is the gateway's (``TGW_TRITON_TIMEOUT_S``) or the
        caller's, whichever comes first (many Tritons: what is left of it is each attempt's Triton
        ``timeout``, ``app.clients.routed``)."""
        info = req.info
        own = time.monotonic() + self.timeout_s
        return TritonCall(
            model=info.name,
            version=info.version,
            inputs=req.inputs,
            datatypes=req.datatypes,
            outputs=req.outputs,
            parameters=req.parameters,
            request_id=req.request_id,
            deadline=own if deadline is None else min(own, deadline),
            options=req.options,
            max_batch_rows=(
                info.max_batch_rows if not req.parameters and req.cacheable and not req.classification else 0
            ),
            classification=req.classification,
        )

    async def _cache_get(self, key: str, remote: bool = True) -> TritonResult | None:
        if not remote:
            return self.cache.l1.get(key) if self.cache.l1 is not None else None
        with _cache_lookup():
            return await self.cache.get(key)

    async def _forward(self, req: InferRequest, deadline: float | None) -> TritonResult:
        info = req.info
        call = self.call_for(req, deadline)
        start = time.perf_counter()
        with self._triton_call("triton.infer", call):
            try:
                async with asyncio.timeout(self.timeout_s + 1.0):
                    result = await self.transport.infer(call)
            except TimeoutError:
                raise UpstreamTimeout("Triton did not answer before the deadline") from None
        if not result.compute_s:  # sent alone: the call's triton stage (a micro-batched one: its share)
            result = replace(result, compute_s=time.perf_counter() - start - call.queued_s)
        if result.model_version and result.model_version != info.version:
            logger.info("model %s answered from version %s, expected %s; refreshing metadata",
                        info.name, result.model_version, info.version)  # fmt: skip
            self.registry.invalidate()
        return result

    async def drain_writes(self, timeout_s: float) -> None:
        """Let cache writes under way land (shutdown), for at most ``timeout_s``."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=timeout_s)

    async def _store(self, key: str, req: InferRequest, result: TritonResult) -> None:
        if result.model_version and result.model_version != req.info.version:
            return  # never file an answer under another version's key
        start = time.perf_counter()
        try:
            with tracing.span("cache.put"):
                await self.cache.put(key, result)
        except CacheUnavailable:
            pass
        finally:
            metrics.cache_operation("put", time.perf_counter() - start)
