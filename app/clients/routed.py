"""Inference over many Tritons (``TGW_TRITON_URLS``): one connection pool per endpoint, a per-endpoint
repository index, power-of-two-choices on outstanding calls, passive ejection and active probes
(``app.clients.endpoints``), and retries that never duplicate work.

Retry rule: a call is retried once, on another endpoint that serves the model, only when it failed before
Triton accepted it: nothing listening (connection refused), a connection reset before any byte of the
answer, or UNAVAILABLE. A timeout or an answer (even an error) is never retried. A retry budget (about
20 % of calls) keeps a failing pool from doubling its load, and the retry gets what is left of the
deadline. Sequence requests (``sequence_id``) stick to the endpoint that saw their first request and are
never retried elsewhere (the sequence's state lives in that Triton).

Fail fast: an endpoint whose readiness probe gets no answer within the probe timeout (a frozen Triton:
SIGSTOP, a hung host) is not answering until a probe or a call gets one. A call for a model none of whose
endpoints is answering is a 503 with ``Retry-After`` at once, instead of waiting out
the freeze; calls already on an endpoint that missed ``ABORT_AFTER_MISSED_PROBES`` probes in a row end
with the same 503 (Triton may have the request: not retried elsewhere). The wait is so bounded by about
that many probe intervals plus probe timeouts (2 x (1 + 1) s by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge

from app.clients.endpoints import Balancer, EndpointAddress, RetryBudget, State, Target, resolve
from app.clients.protocols import InferenceTransport, TritonCall, TritonResult
from app.clients.triton import TritonGrpcClient
from app.clients.triton_http import TritonHttpInfer, UpstreamBroken
from app.errors import GatewayError, UpstreamTimeout, UpstreamUnavailable
from app.tasks import stop_task

logger = logging.getLogger(__name__)
T = TypeVar("T")

ENDPOINT_STATE = Gauge(
    "tgw_triton_endpoint_state", "1 for the state each Triton endpoint is in (healthy, slow_start, ejected)",
    ["endpoint", "state"], multiprocess_mode="livemax",
)  # fmt: skip
ENDPOINT_OUTSTANDING = Gauge(
    "tgw_triton_endpoint_outstanding", "Inference calls in flight per Triton endpoint", ["endpoint"],
    multiprocess_mode="livesum",
)  # fmt: skip
ENDPOINT_CALLS = Counter(
    "tgw_triton_endpoint_calls", "Inference calls per Triton endpoint (ok, error, failure, retried)",
    ["endpoint", "outcome"],
)  # fmt: skip
ENDPOINT_EJECTIONS = Counter("tgw_triton_endpoint_ejections", "Ejections per Triton endpoint", ["endpoint"])

ABORT_AFTER_MISSED_PROBES = 2  # calls in flight on a frozen endpoint end after this many missed probes

_CONNECT_MARKERS = (
    "cannot connect", "failed to connect", "connection refused", "connections to all backends",
)  # fmt: skip


def _connect_failure(exc: GatewayError) -> bool:
    return any(marker in exc.message.lower() for marker in _CONNECT_MARKERS)


@dataclass
class Endpoint:
    """One Triton: its admin client (gRPC), the client inference uses (HTTP pool or the same gRPC) and
    the models and versions it serves (from its own repository index)."""

    address: EndpointAddress
    admin: TritonGrpcClient  # TritonAdmin
    transport: InferenceTransport  # its HTTP pool, or the admin's gRPC channels
    index: list[dict[str, Any]] = field(default_factory=list)
    ready: dict[str, set[str]] = field(default_factory=dict)  # model -> READY versions
    index_at: float = float("-inf")

    @property
    def name(self) -> str:
        return self.address.name

    def set_index(self, index: list[dict[str, Any]]) -> None:
        self.index = index
        ready: dict[str, set[str]] = {}
        for entry in index:
            if entry.get("state") == "READY":
                ready.setdefault(str(entry.get("name", "")), set()).add(str(entry.get("version", "")))
        self.ready = ready
        self.index_at = time.monotonic()

    def serves(self, model: str, version: str) -> bool:
        versions = self.ready.get(model)
        return versions is not None and (not version or version in versions)


@dataclass
class RoutingOptions:
    probe_interval_s: float = 1.0
    probe_timeout_s: float = 1.0
    resolve_interval_s: float = 10.0
    index_ttl_s: float = 5.0
    eject_after: int = 3
    eject_base_s: float = 1.0
    eject_max_s: float = 30.0
    slow_start_s: float = 5.0
    retry_ratio: float = 0.2
    retry_after_s: int = 2
    channels: int = 1
    grpc_args: list[tuple[str, int]] | None = None
    max_sequences: int = 100_000
    retries: int = 0  # per endpoint, on UNAVAILABLE before the request left (one Triton: TGW_TRITON_RETRIES)
    # Each attempt carries what is left of the deadline as Triton's ``timeout`` (many Tritons). One Triton:
    # the call's own timeout passes as it is, as it did before there were many.
    deadline_as_timeout: bool = True


EndpointFactory = Callable[[EndpointAddress], Endpoint]


class RoutedTriton:
    """``TritonAdmin`` and ``InferenceTransport`` over every endpoint of ``targets``. ``start()`` resolves
    them, reads each one's repository index and runs the probe loop; ``close()`` stops it, closes every
    pool."""

    def __init__(
        self, targets: Sequence[Target], options: RoutingOptions | None = None,
        factory: EndpointFactory | None = None, lookup: Callable[[str], list[str]] | None = None,
    ) -> None:  # fmt: skip
        self.targets = list(targets)
        # Many Tritons (or a DNS name that may stand for many): /readyz reports each endpoint.
        self.many = len(self.targets) > 1 or any(t.dns_host for t in self.targets)
        self.options = options or RoutingOptions()
        self._factory = factory or self._make_endpoint
        self._lookup = lookup
        self.endpoints: dict[str, Endpoint] = {}
        opts = self.options
        self.balancer = Balancer(opts.eject_after, opts.eject_base_s, opts.eject_max_s, opts.slow_start_s)
        self.budget = RetryBudget(opts.retry_ratio)
        self._sequences: OrderedDict[Any, str] = OrderedDict()
        self._task: asyncio.Task[None] | None = None
        self._resolved_at = float("-inf")
        self.retries = 0
        self._calls: dict[str, set[asyncio.Task[Any]]] = {}  # per endpoint: tasks with a call on it
        self._aborted: set[asyncio.Task[Any]] = set()  # cancelled by _abort_calls (not by their owner)

    # --- life ---
    def _make_endpoint(self, address: EndpointAddress) -> Endpoint:
        opts = self.options
        admin = TritonGrpcClient(address.grpc, channels=opts.channels, retries=opts.retries,
                                 retry_after_s=opts.retry_after_s, args=opts.grpc_args)  # fmt: skip
        transport: InferenceTransport = admin
        if address.http:
            transport = TritonHttpInfer(address.http, retries=opts.retries, retry_after_s=opts.retry_after_s)
        return Endpoint(address, admin, transport)

    async def _resolve(self) -> None:
        try:
            addresses = await asyncio.to_thread(resolve, self.targets, self._lookup)
        except OSError as exc:
            logger.warning(
                "resolving Triton endpoints failed (%s); keeping %d known", exc, len(self.endpoints)
            )
            return
        finally:
            self._resolved_at = time.monotonic()
        wanted = {a.name: a for a in addresses}
        for name in set(self.endpoints) - set(wanted):
            logger.info("Triton endpoint %s left the set", name)
            gone = self.endpoints.pop(name)
            await self._close_endpoint(gone)
        for name, address in wanted.items():
            if name not in self.endpoints:
                logger.info("Triton endpoint %s joined the set", name)
                self.endpoints[name] = self._factory(address)
        self.balancer.set_names(self.endpoints)

    @staticmethod
    async def _close_endpoint(endpoint: Endpoint) -> None:
        with contextlib.suppress(Exception):
            if endpoint.transport is not endpoint.admin:
                await endpoint.transport.close()
            await endpoint.admin.close()

    async def start(self) -> None:
        await self._resolve()
        await asyncio.gather(*(self._refresh_index(e) for e in list(self.endpoints.values())))
        self._task = asyncio.create_task(self._loop(), name="triton-endpoint-probes")

    async def close(self) -> None:
        await stop_task(self._task)
        self._task = None
        for endpoint in list(self.endpoints.values()):
            await self._close_endpoint(endpoint)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.options.probe_interval_s)
            try:
                await self.probe_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Triton endpoint probe round failed")

    async def probe_once(self) -> None:
        """One round: DNS when due, a readiness probe per endpoint, stale indexes re-read, metrics set."""
        if any(t.dns_host for t in self.targets) and (
            time.monotonic() - self._resolved_at >= self.options.resolve_interval_s
        ):
            await self._resolve()
        await asyncio.gather(*(self._probe(e) for e in list(self.endpoints.values())))
        self._export()

    async def _probe(self, endpoint: Endpoint) -> None:
        name = endpoint.name
        if name not in self.balancer.endpoints:
            return
        health = self.balancer.endpoints[name]
        frozen = health.missed_probes > 0  # probed every round, ejected or not: calls end, a return shows
        if health.state is State.EJECTED and not frozen and not self.balancer.due_for_probe(name):
            return
        answered = True
        try:
            async with asyncio.timeout(self.options.probe_timeout_s):
                ready = bool(await endpoint.admin.server_ready())
                if ready and endpoint.transport is not endpoint.admin:
                    ready = bool(await endpoint.transport.live())
        except TimeoutError:
            ready = answered = False
        except (GatewayError, OSError):
            ready = False
        was = health.state
        if ready and (
            was is State.EJECTED or time.monotonic() - endpoint.index_at >= self.options.index_ttl_s
        ):
            await self._refresh_index(endpoint)
        was_answering = health.missed_probes == 0
        self.balancer.probe(name, ready, answered)
        if was_answering and not answered:
            logger.warning("Triton endpoint %s: readiness probe not answered within %g s",
                           name, self.options.probe_timeout_s)  # fmt: skip
        elif answered and not was_answering:
            logger.warning("Triton endpoint %s answers again", name)
        if health.missed_probes >= ABORT_AFTER_MISSED_PROBES:
            self._abort_calls(name)
        if health.state is not was:
            logger.warning("Triton endpoint %s: %s -> %s", name, was.value, health.state.value)
            if health.state is State.EJECTED:
                ENDPOINT_EJECTIONS.labels(name).inc()

    async def _refresh_index(self, endpoint: Endpoint) -> bool:
        try:
            async with asyncio.timeout(max(self.options.probe_timeout_s, 2.0)):
                endpoint.set_index(list(await endpoint.admin.repository_index()))
        except (TimeoutError, GatewayError, OSError) as exc:
            logger.info("Triton endpoint %s: repository index not read (%s)", endpoint.name, exc)
            return False
        return True

    def _export(self) -> None:
        for name, snap in self.balancer.snapshot().items():
            for state in State:
                ENDPOINT_STATE.labels(name, state.value).set(1 if snap["state"] == state.value else 0)
            ENDPOINT_OUTSTANDING.labels(name).set(float(snap["outstanding"]))  # type: ignore[arg-type]

    def endpoint_states(self) -> dict[str, dict[str, object]]:
        """Per endpoint: state, outstanding calls, failures, models served (for /readyz)."""
        out = self.balancer.snapshot()
        for name, snap in out.items():
            endpoint = self.endpoints.get(name)
            if endpoint is not None:
                snap["http"] = endpoint.address.http
                snap["models"] = sorted(endpoint.ready)
        return out

    # --- routing ---
    def _candidates(self, model: str, version: str) -> list[str]:
        serving = [n for n, e in self.endpoints.items() if e.serves(model, version)]
        if serving:
            return serving
        unknown = [n for n, e in self.endpoints.items() if e.index_at == float("-inf")]
        return unknown or list(self.endpoints)  # no index says: let Triton answer (404 from Triton)

    def _healthy(self, names: Sequence[str]) -> bool:
        """Some endpoint of ``names`` answers probes (one ejected for failures is still tried, as before)."""
        return any(map(self.balancer.answering, names))

    def _not_answering(self, model: str) -> UpstreamUnavailable:
        return UpstreamUnavailable(
            f"no Triton endpoint serving {model} is answering (readiness probes timed out); retry shortly",
            retry_after_s=self.options.retry_after_s,
        )

    def _abort_calls(self, name: str) -> None:
        """End the calls waiting on a frozen endpoint (each gets a 503 from ``_on``)."""
        for task in list(self._calls.get(name, ())):
            if task not in self._aborted and not task.done():
                self._aborted.add(task)
                task.cancel()

    async def _on(self, name: str, fn: Callable[[Endpoint], Awaitable[T]]) -> T:
        endpoint = self.endpoints[name]
        self.balancer.start(name)
        task = asyncio.current_task()
        calls = self._calls.setdefault(name, set())
        if task is not None:
            calls.add(task)
        try:
            result = await fn(endpoint)
        except asyncio.CancelledError:
            if task is None or task not in self._aborted:
                raise
            self._aborted.discard(task)
            task.uncancel()  # ours (_abort_calls), not the caller's: it becomes the 503
            ENDPOINT_CALLS.labels(name, "failure").inc()
            raise UpstreamBroken(  # Triton may have the request: not retried elsewhere
                f"Triton endpoint {name} stopped answering (readiness probes timed out); retry shortly",
                retry_after_s=self.options.retry_after_s,
            ) from None
        except GatewayError as exc:
            self._settle(name, exc)
            raise
        finally:
            self.balancer.finish(name)
            if task is not None:
                calls.discard(task)
                if task in self._aborted:  # our cancel came too late and was absorbed: take it back
                    self._aborted.discard(task)
                    task.uncancel()
        self.balancer.success(name)
        ENDPOINT_CALLS.labels(name, "ok").inc()
        return result

    async def infer(self, call: TritonCall) -> TritonResult:
        """``InferenceTransport.infer`` over the endpoints serving ``call.model``; each attempt carries what
        is left of the deadline as Triton's own ``timeout`` too (unless the client asked for less)."""
        first = self._pick_for(call)
        if call.sequenced:  # its state lives in one Triton: always there, never elsewhere
            return await self._on(first, lambda e: e.transport.infer(self._timed(call)))
        self.budget.request()
        try:
            return await self._on(first, lambda e: e.transport.infer(self._timed(call)))
        except UpstreamUnavailable as exc:
            second = self.balancer.pick(self._candidates(call.model, call.version), exclude=(first,))
            accepted = isinstance(exc, UpstreamBroken)  # Triton had it: never twice
            late = bool(call.deadline) and call.deadline - time.monotonic() <= 0.001
            if accepted or second is None or late or not self.budget.try_spend():
                raise
        self.retries += 1
        ENDPOINT_CALLS.labels(first, "retried").inc()
        return await self._on(second, lambda e: e.transport.infer(self._timed(call)))

    def _pick_for(self, call: TritonCall, exclude: Sequence[str] = ()) -> str:
        """The endpoint for ``call``: a sequence's own (sticky), else power of two choices; a 503 at once
        when none serving the model answers probes."""
        if not self.endpoints:
            raise UpstreamUnavailable("no Triton endpoint is known", retry_after_s=self.options.retry_after_s)
        candidates = self._candidates(call.model, call.version)
        if call.sequenced:
            sequence = call.options.sequence_id
            name = self._sequences.get(sequence)
            if name is None or name not in self.endpoints:
                name = self.balancer.pick(candidates)
                assert name is not None
                self._sequences[sequence] = name
                while len(self._sequences) > self.options.max_sequences:
                    self._sequences.popitem(last=False)
            else:
                self._sequences.move_to_end(sequence)
            if not self._healthy((name,)):
                raise self._not_answering(call.model)
            if call.options.sequence_end:
                self._sequences.pop(sequence, None)
            return name
        if not self._healthy(candidates):
            raise self._not_answering(call.model)
        name = self.balancer.pick(candidates, exclude=exclude)
        if name is None:
            raise self._not_answering(call.model)
        return name

    async def stream(self, call: TritonCall) -> AsyncIterator[TritonResult]:
        """``InferenceTransport.stream`` on one endpoint's gRPC channel (streams never go over HTTP). A
        stream that failed before Triton accepted it (nothing listening) is opened once more elsewhere,
        within the retry budget; once a response came, never (the model has started)."""
        first = self._pick_for(call)
        self.budget.request()
        answered = False
        try:
            async for result in self._stream_on(first, call):
                answered = True
                yield result
            return
        except UpstreamUnavailable as exc:
            if answered or call.sequenced or not _connect_failure(exc) or not self.budget.try_spend():
                raise
            try:
                second = self._pick_for(call, exclude=(first,))
            except UpstreamUnavailable:
                raise exc from None
            if second == first:
                raise
        self.retries += 1
        ENDPOINT_CALLS.labels(first, "retried").inc()
        async for result in self._stream_on(second, call):
            yield result

    async def _stream_on(self, name: str, call: TritonCall) -> AsyncIterator[TritonResult]:
        endpoint = self.endpoints[name]
        self.balancer.start(name)
        try:
            async for result in endpoint.admin.stream(self._timed(call)):
                yield result
        except GatewayError as exc:
            self._settle(name, exc)
            raise
        finally:
            self.balancer.finish(name)
        self.balancer.success(name)
        ENDPOINT_CALLS.labels(name, "ok").inc()

    def _settle(self, name: str, exc: GatewayError) -> None:
        """A call on ``name`` ended in ``exc``: unavailable or no answer in time counts towards the
        endpoint's ejection (at once when nothing listens); an answer, even an error, does not."""
        if not isinstance(exc, UpstreamUnavailable | UpstreamTimeout):
            self.balancer.success(name)  # Triton answered (a model error is not an endpoint failure)
            ENDPOINT_CALLS.labels(name, "error").inc()
            return
        connect = isinstance(exc, UpstreamUnavailable) and _connect_failure(exc)
        if self.balancer.failure(name, connect=connect):
            ENDPOINT_EJECTIONS.labels(name).inc()
            logger.warning("Triton endpoint %s ejected: %s", name, exc.message)
        ENDPOINT_CALLS.labels(name, "failure").inc()

    def _timed(self, call: TritonCall) -> TritonCall:
        return _with_timeout(call) if self.options.deadline_as_timeout else call

    async def live(self) -> bool:
        """Some endpoint in rotation answers on the transport inference uses."""
        live = await asyncio.gather(
            *(e.transport.live() for n, e in self.endpoints.items() if self.balancer.in_rotation(n)),
            return_exceptions=True,
        )
        return any(x is True for x in live)

    # --- TritonAdmin ---
    async def _any(self, fn: Callable[[Endpoint], Awaitable[T]], names: Sequence[str] | None = None) -> T:
        """An admin call on the first endpoint in rotation that answers (in rotation first)."""
        order = list(names if names is not None else self.endpoints)
        order.sort(key=lambda n: not self.balancer.in_rotation(n))
        error: GatewayError = UpstreamUnavailable(
            "no Triton endpoint answered", retry_after_s=self.options.retry_after_s
        )
        for name in order:
            try:
                return await fn(self.endpoints[name])
            except UpstreamUnavailable as exc:
                error = exc
        raise error

    async def server_live(self) -> bool:
        """Some endpoint in rotation is live on its admin channel and on the transport inference uses."""

        async def live(e: Endpoint) -> bool:
            return await e.admin.server_live() and (e.transport is e.admin or await e.transport.live())

        found = await asyncio.gather(
            *(live(e) for n, e in self.endpoints.items() if self.balancer.in_rotation(n)),
            return_exceptions=True,
        )
        return any(x is True for x in found)

    async def server_ready(self) -> bool:
        ready = await asyncio.gather(
            *(e.admin.server_ready() for n, e in self.endpoints.items() if self.balancer.in_rotation(n))
        )
        return any(ready)

    async def server_metadata(self) -> dict[str, Any]:
        return await self._any(lambda e: e.admin.server_metadata())

    async def repository_index(self) -> list[dict[str, Any]]:
        """Every endpoint's index merged: a version is READY when it is READY on any endpoint in rotation."""
        stale = [
            e for n, e in self.endpoints.items()
            if self.balancer.in_rotation(n) and time.monotonic() - e.index_at >= self.options.index_ttl_s
        ]  # fmt: skip
        if stale:
            await asyncio.gather(*(self._refresh_index(e) for e in stale))
        if all(e.index_at == float("-inf") for e in self.endpoints.values()):
            # no endpoint's index was ever read: Triton is unreachable, not empty (a 503, never a 404)
            raise UpstreamUnavailable("no Triton endpoint answered", retry_after_s=self.options.retry_after_s)
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for name, endpoint in self.endpoints.items():
            in_rotation = self.balancer.in_rotation(name)
            for entry in endpoint.index:
                key = (str(entry.get("name", "")), str(entry.get("version", "")))
                ready = entry.get("state") == "READY" and in_rotation
                known = merged.get(key)
                if known is None or (ready and known.get("state") != "READY"):
                    merged[key] = dict(entry) if ready or entry.get("state") != "READY" else {
                        **entry, "state": "UNAVAILABLE", "reason": "its Triton endpoints are out of rotation"
                    }  # fmt: skip
        return [merged[k] for k in sorted(merged)]

    def _serving(self, model: str, version: str) -> list[str]:
        serving = [n for n, e in self.endpoints.items() if e.serves(model, version)]
        return serving or list(self.endpoints)

    async def model_metadata(self, model: str, version: str = "") -> dict[str, Any]:
        return await self._any(
            lambda e: e.admin.model_metadata(model, version), self._serving(model, version)
        )

    async def model_config(self, model: str, version: str = "") -> dict[str, Any]:
        return await self._any(lambda e: e.admin.model_config(model, version), self._serving(model, version))

    async def model_statistics(self, model: str = "", version: str = "") -> dict[str, Any]:
        """Every endpoint's statistics, ``model_stats`` concatenated (each entry names its endpoint)."""
        stats: list[dict[str, Any]] = []
        for name in list(self.endpoints):
            if not self.balancer.in_rotation(name):
                continue
            try:
                out = await self.endpoints[name].admin.model_statistics(model, version)
            except UpstreamUnavailable:
                continue
            stats += [{**entry, "endpoint": name} for entry in out.get("model_stats", [])]
        return {"model_stats": stats}


def _with_timeout(call: TritonCall) -> TritonCall:
    """The call with Triton's ``timeout`` set to what is left of its deadline (Triton drops it from its
    queue past that), unless the client asked for less."""
    if not call.deadline:
        return call
    left_us = int(call.remaining_s() * 1_000_000)
    asked = call.options.timeout_us
    if asked and asked <= left_us:
        return call
    return replace(call, options=replace(call.options, timeout_us=left_us))


def routing_options(settings: Any, retry_after_s: int) -> RoutingOptions:
    """``RoutingOptions`` from ``Settings.triton`` (the ``triton_*`` routing fields; ``retry_after_s``:
    TGW_RETRY_AFTER_S). One Triton
    (``TGW_TRITON_URL``): its client retries ``TGW_TRITON_RETRIES`` times (no other endpoint to retry on);
    it is never ejected (at most half a pool is), but the probes still make a frozen Triton a quick 503."""
    from app.clients.triton import settings_channel_args

    one = not settings.triton_urls
    return RoutingOptions(
        probe_interval_s=settings.triton_probe_interval_s,
        resolve_interval_s=settings.triton_resolve_interval_s,
        index_ttl_s=max(settings.metadata_ttl_s, 1.0),
        eject_after=settings.triton_eject_after,
        eject_base_s=settings.triton_eject_base_s,
        slow_start_s=settings.triton_slow_start_s,
        retry_ratio=settings.triton_retry_budget,
        retry_after_s=retry_after_s,
        channels=settings.triton_channels,
        grpc_args=settings_channel_args(settings),
        retries=settings.triton_retries if one else 0,
        deadline_as_timeout=not one,
    )


def triton_targets(settings: Any, grpc_address: str) -> list[Target]:
    """The Tritons the gateway talks to (``settings``: ``Settings.triton``): ``TGW_TRITON_URLS``, else the
    one ``grpc_address`` (``TGW_TRITON_URL`` or the embedded Triton), with inference over
    ``TGW_TRITON_HTTP_URL`` when that is set."""
    from app.clients.endpoints import parse_triton_urls

    if settings.triton_urls:
        return parse_triton_urls(settings.triton_urls)
    return [Target(EndpointAddress(grpc_address, settings.triton_http_url or None))]
