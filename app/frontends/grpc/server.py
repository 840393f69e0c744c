"""The gRPC front door: ``inference.GRPCInferenceService`` (the service Triton serves, so
``tritonclient.grpc`` works unchanged) on ``TGW_GRPC_PORT``, with ``grpc.aio`` in the event loop of the HTTP
server, started and stopped by the application lifespan.

Inference goes through the same ``InferenceService`` as HTTP: validation against the model's metadata
(``app.frontends.grpc.codec``), the response cache in the same key space (a request answered over HTTP
is a hit over gRPC and the other way round), single-flight and micro-batching. Per RPC, like the HTTP
pipeline: the request id (the request's ``id``, else ``x-request-id`` metadata, else generated; passed to
Triton and
returned as ``x-request-id`` trailing metadata beside ``x-cache``), ``tgw_grpc_requests_total`` and
``tgw_grpc_request_duration_seconds``, a tracing SERVER span, one access-log line, and the
authentication and limits of the caller's API key from the call metadata (``Servicer.admit``, the
auth stage's ``admit_headers``; the key's tier sets Triton priority, timeout bound and cache scope).

``ModelStreamInfer`` (``_Stream``): requests for ordinary models are answered through the pipeline, in
the order they came; requests for decoupled models (each on its own upstream stream) and sequence requests
(which must reach one Triton in order and are never cached; on one upstream stream) are relayed to Triton,
re-encoded from the validated request (never the client's bytes), and its responses streamed back as they
come. Each message is checked and limited like a unary call; at most TGW_GRPC_STREAM_MAX_IN_FLIGHT are
unanswered, past that the stream is not read. An undecodable message is INVALID_ARGUMENT (``add_servicer``).

RPCs the gateway does not offer (``app.services.offer``) answer PERMISSION_DENIED or UNIMPLEMENTED with a
message saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2, service_pb2_grpc

from app.auth.principal import Principal, Unauthorized
from app.clients.protocols import TritonAdmin
from app.errors import (
    GatewayError,
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    log_gateway_error,
    log_unhandled,
)
from app.frontends.grpc import codec
from app.frontends.grpc.status import grpc_code
from app.observability import tracing
from app.observability.requests import Requests, Served
from app.request_context import Caller, RequestContext, set_request_id
from app.services.health import HealthService
from app.services.inference import InferenceService, InferResponse
from app.services.offer import EXTENSIONS, REFUSED_RPCS, refusal
from app.services.offload import DECODE_POOL_BYTES, INLINE, Offload
from app.services.registry import ModelInfo, ModelRegistry
from app.settings import ServerSettings

if TYPE_CHECKING:
    from app.auth.stage import AuthStage
    from app.gateway import Gateway

logger = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"


# Authentication classes of the RPCs, as the HTTP paths they mirror (app.auth.stage.path_class):
# health is open, the repository needs an admin credential, everything else a key.
OPEN_RPCS = frozenset({"ServerLive", "ServerReady"})
ADMIN_RPCS = frozenset({"RepositoryIndex"})


def _peer_address(context: grpc.aio.ServicerContext) -> str:
    """``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678`` -> the address (for the auth stage's failure counts)."""
    peer = context.peer() or "unknown"
    address = peer.split(":", 1)[1] if ":" in peer else peer
    return address.rsplit(":", 1)[0].strip("[]") or "unknown"


class Undecodable:
    """A request message the servicer refuses unread: one that does not parse as the RPC's protobuf
    (answered INVALID_ARGUMENT as Triton does, never UNKNOWN "Unexpected DecodeError"), or one over the
    message limit (``error``: 413, RESOURCE_EXHAUSTED). The lenient deserializer's stand-in: the refusal
    is then answered, counted and logged like any other, under the call's request id."""

    __slots__ = ("error",)
    id = ""

    def __init__(self, error: GatewayError) -> None:
        self.error = error


# gRPC core refuses a message only above this much more than TGW_GRPC_MAX_MESSAGE_BYTES (a bare
# RESOURCE_EXHAUSTED: no request id, not counted by the gateway); up to it the servicer answers the
# message over the limit itself, as every door answers a body over its limit (413 -> RESOURCE_EXHAUSTED).
CORE_RECEIVE_SLACK_BYTES = 1 << 20


def _lenient(parse: Callable[[bytes], Any], name: str, limit: int) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if limit and len(data) > limit:
            return Undecodable(PayloadTooLarge(
                f"the request message ({len(data)} bytes) exceeds the limit of {limit} bytes "
                "(TGW_GRPC_MAX_MESSAGE_BYTES)", {"limit_bytes": limit},
            ))  # fmt: skip
        try:
            return parse(data)
        except DecodeError:
            return Undecodable(InvalidInput(f"the request is not a valid inference.{name} message"))

    return deserialize


def add_servicer(servicer: Servicer, server: Any, max_message_bytes: int = 0) -> None:
    """``add_GRPCInferenceServiceServicer_to_server`` with deserializers that turn an undecodable message,
    or one over ``max_message_bytes``, into ``Undecodable`` instead of failing inside gRPC (UNKNOWN)."""
    captured: dict[str, Any] = {}

    class _Capture:
        def add_generic_rpc_handlers(self, handlers: Any) -> None:
            pass

        def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
            captured.update(handlers)

    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, _Capture())
    handlers = {}
    for method, handler in captured.items():
        parse = handler.request_deserializer
        message = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        name = message.name if message is not None else f"{method}Request"
        handlers[method] = handler._replace(request_deserializer=_lenient(parse, name, max_message_bytes))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


@dataclass(slots=True)
class _Call:
    """One RPC: what is served (``Served``: its id, span, metric and access-log line) and how it ended."""

    served: Served
    code: grpc.StatusCode = grpc.StatusCode.OK
    caller: Caller | None = None  # the key admitted for it (None: TGW_AUTH=off, or an open RPC)

    @property
    def request_id(self) -> str:
        return self.served.request_id


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    """The client's deadline as a ``time.monotonic()`` instant (None: the call has none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


# What Triton answers a decoupled model's unary ModelInfer (the core's refusal, in gRPC's words).
DECOUPLED_UNARY = (
    "ModelInfer RPC doesn't support models with decoupled transaction policy; use ModelStreamInfer"
)


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def _server_span(method: str, metadata: Mapping[str, str]) -> contextlib.AbstractContextManager[Any]:
    return tracing.rpc_server_span(SERVICE, method, metadata)


def _error_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, GatewayError):
        log_gateway_error(exc)
        if exc.details.get("reason") == "decoupled":
            return grpc_code(exc), DECOUPLED_UNARY
        return grpc_code(exc), exc.message
    if isinstance(exc, grpc.aio.AioRpcError):  # a relayed call to Triton failed: pass Triton's status on
        return exc.code(), exc.details() or exc.code().name
    _, _, message = log_unhandled(exc)
    return grpc.StatusCode.INTERNAL, message


Handler = Callable[[Any, Any, grpc.aio.ServicerContext, _Call], Awaitable[Any]]


def unary(method: Handler) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """Wrap a unary RPC in the per-request pipeline (id, auth, span, metric, access log, error status)."""
    name = method.__name__

    async def rpc(self: Servicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = _metadata(context)
        rid = set_request_id(getattr(request, "id", "") or meta.get("x-request-id"))
        failure: tuple[grpc.StatusCode, str] | None = None
        principal: Principal | None = None
        with _server_span(name, meta) as span:
            call = _Call(self.requests.begin("grpc", name, "", rid, span))
            try:
                principal = await self.admit(name, meta, context)
                call.caller = principal
                if isinstance(request, Undecodable):
                    raise request.error
                return await method(self, request, context, call)
            except asyncio.CancelledError:
                call.code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                failure = _error_status(exc)
                call.code = failure[0]
            finally:
                if principal is not None and self.auth is not None:
                    self.auth.release(principal)
                call.served.end(call.code.name)
        context.set_trailing_metadata((("x-request-id", call.request_id),))
        await context.abort(*failure)

    rpc.__name__ = name
    return rpc


def refused(name: str) -> Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    """An RPC the gateway refuses on purpose (``app.services.offer``): 403 -> PERMISSION_DENIED,
    501 -> UNIMPLEMENTED, with the reason as the message."""
    feature = REFUSED_RPCS[name]

    async def method(self: Servicer, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        raise refusal(feature)

    method.__name__ = name
    return unary(method)


class Servicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Every RPC of ``inference.GRPCInferenceService``: served, relayed to Triton, or refused (REFUSED)."""

    def __init__(
        self, inference: InferenceService, registry: ModelRegistry, health: HealthService,
        admin: TritonAdmin, auth: AuthStage | None = None, stream_max_in_flight: int = 32,
        offload: Offload = INLINE, requests: Requests | None = None,
    ) -> None:  # fmt: skip
        self.inference = inference
        self.offload = offload
        self.registry = registry
        self.health = health
        self.admin = admin
        self.triton_version = _triton_version(admin)
        self.auth = auth
        self.stream_max_in_flight = stream_max_in_flight
        self.requests = requests or Requests()  # each RPC's metrics and access-log line

    async def admit(self, method: str, metadata: Mapping[str, str], context: grpc.aio.ServicerContext) -> Any:
        """THE authentication point of the gRPC front door: the caller's key from the call metadata
        (``authorization: Bearer …`` / ``x-api-key``, as HTTP headers), its limits taken; raises 401 ->
        UNAUTHENTICATED, 403 -> PERMISSION_DENIED, 429 -> RESOURCE_EXHAUSTED. Returns the principal to
        ``release`` when the call is over (None: nothing to release)."""
        if self.auth is None or method in OPEN_RPCS:
            return None
        kind = "ws" if method == "ModelStreamInfer" else "req"
        return await self.auth.admit_headers(metadata, _peer_address(context), method in ADMIN_RPCS, kind)

    # --- health and metadata: answered by the gateway ------------------------------------------
    @unary
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        return service_pb2.ServerLiveResponse(live=True)

    @unary
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        ready, _ = await self.health.readiness()
        return service_pb2.ServerReadyResponse(ready=ready)

    @unary
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        try:
            versions = await self.registry.ready_versions(request.name)
        except ModelNotFound:
            return service_pb2.ModelReadyResponse(ready=False)
        ok = (request.version in versions) if request.version else bool(versions)
        return service_pb2.ModelReadyResponse(ready=ok)

    @unary
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        return service_pb2.ServerMetadataResponse(
            name="triton-gateway", version=await self.triton_version(), extensions=EXTENSIONS
        )

    @unary
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        info = await self.registry.resolve(request.name, request.version or None)
        metadata = info.kserve_metadata(all_versions=not request.version)
        return json_format.ParseDict(metadata, service_pb2.ModelMetadataResponse())

    @unary
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        info = await self.registry.resolve(request.name, request.version or None)
        return json_format.ParseDict(
            {"config": info.config}, service_pb2.ModelConfigResponse(), ignore_unknown_fields=True
        )

    # --- answered from Triton's, through the clients (every Triton of TGW_TRITON_URLS) ------------------
    @unary
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        served = self.inference.served
        if served is None:
            stats = await self.admin.model_statistics(request.name, request.version)
        else:
            stats = await served.answer(request.name, request.version)  # as /v2/.../stats answers them
        response = service_pb2.ModelStatisticsResponse()
        return json_format.ParseDict(stats, response, ignore_unknown_fields=True)

    @unary
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        index = await self.admin.repository_index()
        if request.ready:
            index = [entry for entry in index if entry.get("state") == "READY"]
        response = service_pb2.RepositoryIndexResponse()
        return json_format.ParseDict({"models": index}, response, ignore_unknown_fields=True)

    # --- inference ---------------------------------------------------------------------------------
    @unary
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        ctx = RequestContext(call.request_id, "grpc", call.caller, deadline=_deadline(context))
        response = await self._infer(request, ctx)
        context.set_trailing_metadata((("x-request-id", call.request_id), ("x-cache", response.cache)))
        return codec.encode(response, request.id)

    async def decode(self, info: ModelInfo, request: Any) -> codec.GrpcRequest:
        """``codec.decode``; a request whose typed ``contents`` hold many values is decoded in the pool (a
        serialized copy crosses: ~1 ms for 8 MiB of FP32), raw data in place (~0.2 ms a MiB)."""
        values = codec.typed_values(request) if self.offload.enabled else 0
        size = values * codec.TYPED_VALUE_BYTES
        if size <= DECODE_POOL_BYTES:
            return codec.decode(info, request)
        return await self.offload.decode(size, codec.decode_message, info, request.SerializeToString())

    async def _infer(self, request: Any, ctx: RequestContext) -> InferResponse:
        info = await self.inference.resolve(request.model_name, request.model_version or None, ctx=ctx)
        decoded = await self.decode(info, request)
        return await self.inference.infer(decoded.request, ctx)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        meta = _metadata(context)
        rid = set_request_id(meta.get("x-request-id"))
        with _server_span("ModelStreamInfer", meta) as span:
            call = _Call(self.requests.begin("grpc", "ModelStreamInfer", "", rid, span))
            try:  # the stream is taken like a WebSocket; each message is checked and limited (_Stream)
                principal = await self.admit("ModelStreamInfer", meta, context)
            except Exception as exc:
                call.code, message = _error_status(exc)
                call.served.end(call.code.name)
                context.set_trailing_metadata((("x-request-id", call.request_id),))  # as a unary refusal
                await context.abort(call.code, message)
            stream = _Stream(self, meta, principal, self.stream_max_in_flight, _deadline(context))
            # the stream's own id (x-request-id metadata, else generated), as a unary call returns its id;
            # each message's id is its response's ``id`` (echoed as sent, as Triton does)
            context.set_trailing_metadata((("x-request-id", call.request_id),))
            try:
                async for item in stream.run(request_iterator):
                    yield item
            except asyncio.CancelledError:
                call.code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                call.code, message = _error_status(exc)
                await context.abort(call.code, message)
            finally:
                await stream.close()
                if principal is not None and self.auth is not None:
                    self.auth.release(principal)
                # a stream that ended OK is not a request of its own: its messages were recorded one by one
                call.served.end(call.code.name, record=call.code != grpc.StatusCode.OK)

    # --- refused, on purpose -------------------------------------------------------------------------
    RepositoryModelLoad = refused("RepositoryModelLoad")
    RepositoryModelUnload = refused("RepositoryModelUnload")
    SystemSharedMemoryStatus = refused("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = refused("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = refused("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = refused("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = refused("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = refused("CudaSharedMemoryUnregister")
    TraceSetting = refused("TraceSetting")
    LogSettings = refused("LogSettings")


_END = object()  # the reader is done: no more answers
_DONE = object()  # a relayed request's upstream stream ended: its pending is finished, nothing is sent
_WAKE = object()  # the key was revoked: wake the sender up


@dataclass(slots=True, eq=False)
class _Pending:
    """One accepted stream message until its last answer has been handed to gRPC: then its place in
    the stream's window and the key's in-flight slot (``principal``) are given back, and it is recorded
    as a request (``served``: counter, latency, access-log line) with ``code``."""

    principal: Principal | None = None
    served: Served | None = None  # None: no message came (the end of the stream)
    code: str = "OK"


def _stream_error(exc: GatewayError | grpc.aio.AioRpcError, client_id: str) -> Any:
    """One failed stream message: ``error_message`` (what Triton sends), and the gRPC status the same
    error has on a unary call in the response's ``status`` parameter (e.g. RESOURCE_EXHAUSTED with
    ``retry_after_s``), so a client can tell a limit from a bad request."""
    if isinstance(exc, GatewayError):
        code, message = grpc_code(exc), exc.message
    else:
        code, message = exc.code(), exc.details() or exc.code().name
    response = codec.error_response(message, client_id)
    params = response.infer_response.parameters
    params["status"].string_param = code.name
    if isinstance(exc, GatewayError) and "retry_after_s" in exc.details:
        params["retry_after_s"].int64_param = int(exc.details["retry_after_s"])
    return response


class _Stream:
    """One ModelStreamInfer call. Ordinary requests go through the pipeline (answered in order, through
    the cache); requests for decoupled models go through ``InferenceService.stream`` (each on its own
    upstream stream, through the clients: routing, ejection and deadlines apply), their responses passed
    on as they come; sequence requests of other models are unary calls (sticky to the sequence's Triton),
    each sent once the previous request of its sequence on this stream has its answer (Triton sees a
    sequence's requests in order). Every message is checked and limited like a unary call (the key still
    valid, its rate, in-flight slots and daily quota); at most ``max_in_flight`` messages are unanswered:
    past that the stream is not read."""

    def __init__(self, servicer: Servicer, metadata: Mapping[str, str], principal: Principal | None,
                 max_in_flight: int, deadline: float | None = None) -> None:  # fmt: skip
        self.servicer = servicer
        self.principal = principal
        self.deadline = deadline  # the stream call's own (each message's context carries it)
        limited = principal is not None and principal.limits is not None
        self.auth = servicer.auth if limited else None
        self.metadata = tuple((k, v) for k, v in metadata.items() if k in ("x-request-id", "traceparent"))
        self.window = asyncio.Semaphore(max_in_flight)
        self.out: asyncio.Queue[tuple[Any, _Pending | None]] = asyncio.Queue(2 * max_in_flight)
        self.pending: set[_Pending] = set()
        self.last_of_sequence: dict[int | str, asyncio.Task[Any]] = {}  # sequence -> its latest request
        self.relays: set[asyncio.Task[None]] = set()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.revoked: GatewayError | None = None

    def _task(self, coro: Any, relay: bool = False) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if relay:
            self.relays.add(task)
            task.add_done_callback(self.relays.discard)
        return task

    async def run(self, requests: AsyncIterator[Any]) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        reader = self._task(self._read(requests))
        if self.auth is not None:
            self._task(self._watch())
        while True:
            item, pending = await self.out.get()
            if self.revoked is not None:
                raise self.revoked
            if item is _END:
                break
            if item is not _DONE:
                try:
                    message = (await item) if isinstance(item, asyncio.Future) else item
                except asyncio.CancelledError:
                    if self.revoked is not None:
                        raise self.revoked from None
                    raise
                if self.revoked is not None:
                    raise self.revoked
                yield message
            if pending is not None:
                self._finish(pending)
        await reader  # re-raises a failure of the reader

    def _finish(self, pending: _Pending, code: str | None = None) -> None:
        if pending in self.pending:
            self.pending.discard(pending)
            self.window.release()
            if pending.principal is not None and self.auth is not None:
                self.auth.release(pending.principal)
            if pending.served is not None:
                pending.served.end(code or pending.code)

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            iterator = aiter(requests)
            while True:
                await self.window.acquire()  # at the bound: the stream is not read until answers go out
                pending = _Pending()
                self.pending.add(pending)
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    self._finish(pending)
                    break
                await self._accept(request, pending)
                if self.revoked is not None:
                    return
            while self.relays:
                await asyncio.gather(*self.relays)
        finally:
            if self.revoked is None:
                await self.out.put((_END, None))

    async def _accept(self, request: Any, pending: _Pending) -> None:
        if isinstance(request, Undecodable):
            raise request.error
        ctx = RequestContext.open("grpc_stream", request.id or None, self.principal, deadline=self.deadline)
        # this message's (its RequestInfo is the current context's: the tasks below run in copies of it)
        pending.served = self.servicer.requests.begin("grpc", "ModelStreamInfer", "", ctx.request_id)
        try:
            if self.auth is not None:
                assert self.principal is not None
                try:
                    await self.auth.recheck(self.principal)
                except Unauthorized as exc:
                    self._revoke(exc)
                    return
                pending.principal = dataclasses.replace(self.principal, slot=None, extra={})
                await self.auth.limit(pending.principal)  # this message's rate, slot and daily quota
            version = request.model_version or None
            info = await self.servicer.inference.resolve(request.model_name, version, stream=True, ctx=ctx)
            decoded = await self.servicer.decode(info, request)
        except GatewayError as exc:
            log_gateway_error(exc)
            pending.code = grpc_code(exc).name
            await self.out.put((_stream_error(exc, request.id), pending))
            return
        if info.decoupled:
            self._task(self._decoupled(decoded, ctx, request.id, pending), relay=True)
        elif decoded.options.sequence:
            key = decoded.request.options.sequence_id
            after = self.last_of_sequence.get(key)
            task = self._task(self._answer(decoded, ctx, request.id, pending, after=after))
            self.last_of_sequence[key] = task
            task.add_done_callback(lambda done: self._sequence_answered(key, done))
            await self.out.put((task, pending))
        else:
            await self.out.put((self._task(self._answer(decoded, ctx, request.id, pending)), pending))

    def _sequence_answered(self, key: int | str, task: asyncio.Task[Any]) -> None:
        if self.last_of_sequence.get(key) is task:
            del self.last_of_sequence[key]

    async def _answer(
        self, decoded: codec.GrpcRequest, ctx: RequestContext, client_id: str, pending: _Pending,
        after: asyncio.Task[Any] | None = None,
    ) -> Any:  # fmt: skip
        if after is not None:  # the previous request of the same sequence first
            await asyncio.wait((after,))
        try:
            response = await self.servicer.inference.infer(decoded.request, ctx)
        except GatewayError as exc:
            log_gateway_error(exc)
            pending.code = grpc_code(exc).name
            return _stream_error(exc, client_id)
        reply = codec.encode(response, client_id)
        if decoded.empty_final_response:  # one response, and it is the last: say so, as Triton does
            reply.parameters["triton_final_response"].bool_param = True
        return service_pb2.ModelStreamInferResponse(infer_response=reply)

    async def _decoupled(
        self, decoded: codec.GrpcRequest, ctx: RequestContext, client_id: str, pending: _Pending
    ) -> None:
        """A decoupled model's responses passed on as Triton sends them; Triton's empty final response
        only if the client asked for it (``triton_enable_empty_final_response``)."""
        wants_final = decoded.empty_final_response
        try:
            async for response in self.servicer.inference.stream(decoded.request, ctx):
                result = response.result
                if result.outputs or wants_final:
                    reply = codec.encode(response, client_id)
                    if wants_final:
                        reply.parameters["triton_final_response"].bool_param = result.final
                    await self.out.put((service_pb2.ModelStreamInferResponse(infer_response=reply), None))
                    await asyncio.sleep(0)  # the writer's turn: a response already here (a replay) is sent
                    # now, not after the rest were encoded (0.3 ms of a replay's first response, measured)
        except GatewayError as exc:
            log_gateway_error(exc)
            pending.code = grpc_code(exc).name
            await self.out.put((_stream_error(exc, client_id), None))
        await self.out.put((_DONE, pending))

    async def _watch(self) -> None:
        """An open stream ends (UNAUTHENTICATED) once its key is revoked or rotated away, within
        TGW_AUTH_KEY_CACHE_S, also while it sends nothing."""
        assert self.auth is not None and self.principal is not None
        every = min(1.0, max(self.auth.cache_s / 5, 0.1))
        while True:
            await asyncio.sleep(every)
            try:
                await self.auth.recheck(self.principal, slack_s=every)
            except Unauthorized as exc:
                self._revoke(exc)
                return

    def _revoke(self, exc: GatewayError) -> None:
        """Nothing more is answered: the sender raises ``exc`` (the stream's status) at once."""
        self.revoked = exc
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task is not current:
                task.cancel()
        with contextlib.suppress(asyncio.QueueFull):
            self.out.put_nowait((_WAKE, None))

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for pending in list(self.pending):
            self._finish(pending, "CANCELLED")  # unanswered when the stream ended


_CHANNEL_OPTIONS = (("grpc.so_reuseport", 1),)


def _triton_version(admin: TritonAdmin) -> Callable[[], Awaitable[str]]:
    """Triton's version (for the gateway's server metadata), asked once and remembered."""
    known: list[str] = []

    async def version() -> str:
        if not known:
            known.append(str((await admin.server_metadata()).get("version", "")))
        return known[0]

    return version


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class GrpcFrontDoor:
    """The gRPC server of one gateway process: ``await start()`` in the lifespan start-up (returns the
    bound port), ``await stop(grace_s)`` at shutdown (no new RPCs; in-flight ones get ``grace_s``)."""

    def __init__(self, settings: ServerSettings, gateway: Gateway, auth: AuthStage | None = None) -> None:
        self.settings = settings
        limit = settings.grpc_max_message_bytes
        options = [*_CHANNEL_OPTIONS, ("grpc.max_send_message_length", limit),
                   ("grpc.max_receive_message_length", limit + CORE_RECEIVE_SLACK_BYTES)]  # fmt: skip
        self.servicer = Servicer(
            gateway.inference, gateway.registry, gateway.health, gateway.admin,
            auth=auth, stream_max_in_flight=settings.grpc_stream_max_in_flight, offload=gateway.offload,
            requests=gateway.requests,
        )  # fmt: skip
        self.server = grpc.aio.server(options=options)
        add_servicer(self.servicer, self.server, limit)
        self.port = 0

    async def start(self) -> int:
        address = _bind_address(self.settings.host, self.settings.grpc_port)
        self.port = self.server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"cannot listen for gRPC on {address} (TGW_GRPC_PORT)")
        await self.server.start()
        logger.info("gRPC (KServe v2) listening on %s", _bind_address(self.settings.host, self.port))
        return self.port

    async def stop(self, grace_s: float) -> None:
        await self.server.stop(grace_s)
