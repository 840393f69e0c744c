"""The gRPC front door: ``inference.GRPCInferenceService`` (the service Triton serves, so
``tritonclient.grpc`` works unchanged) on ``TGW_GRPC_PORT``, with ``grpc.aio`` in the event loop of the HTTP
server, started and stopped by the application lifespan.

Inference goes through the same ``InferenceService`` as HTTP: validation against the model's metadata
(``app.codecs.grpc``), the response cache in the same key space (a request answered over HTTP is a hit
over gRPC and the other way round), single-flight and micro-batching. Per RPC, like the HTTP pipeline:
the request id (the request's ``id``, else ``x-request-id`` metadata, else generated; passed to Triton and
returned as ``x-request-id`` trailing metadata beside ``x-cache``), ``tgw_grpc_requests_total`` and
``tgw_grpc_request_duration_seconds``, a tracing SERVER span, one access-log line, and the
authentication and limits of the caller's API key from the call metadata (``Servicer.admit``, the
auth stage's ``admit_headers``; the key's tier sets Triton priority, timeout bound and cache scope).

``ModelStreamInfer``: requests for ordinary models are answered through the pipeline, in the order they
came; requests for decoupled models, and sequence requests (which must reach one Triton in order and are
never cached), are relayed on one upstream stream to Triton and its responses streamed back as they come.

RPCs the gateway does not offer (``app.services.offer``) answer PERMISSION_DENIED or UNIMPLEMENTED with a
message saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import json_format
from tritonclient.grpc import service_pb2, service_pb2_grpc

from app.auth.principal import Principal, apply_principal, current_principal
from app.clients.protocols import TritonAdmin
from app.codecs import grpc as codec
from app.errors import GatewayError, ModelNotFound, log_gateway_error, log_unhandled
from app.frontends.grpc.status import grpc_code
from app.observability import metrics, tracing
from app.observability.context import RequestInfo, begin_request
from app.request_context import set_request_id
from app.services.health import HealthService
from app.services.inference import InferenceService, InferResponse
from app.services.offer import EXTENSIONS, REFUSED_RPCS, refusal
from app.services.registry import ModelRegistry
from app.settings import Settings

if TYPE_CHECKING:
    from app.auth.stage import AuthStage
    from app.gateway import Gateway

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("app.access")

SERVICE = "inference.GRPCInferenceService"
_QUIET = frozenset({"ServerLive", "ServerReady", "ModelReady"})


# Authentication classes of the RPCs, as the HTTP paths they mirror (app.auth.stage.path_class):
# health is open, the repository needs an admin credential, everything else a key.
OPEN_RPCS = frozenset({"ServerLive", "ServerReady"})
ADMIN_RPCS = frozenset({"RepositoryIndex"})


def _peer_address(context: grpc.aio.ServicerContext) -> str:
    """``ipv4:1.2.3.4:5678`` / ``ipv6:[::1]:5678`` -> the address (for the auth stage's failure counts)."""
    peer = context.peer() or "unknown"
    address = peer.split(":", 1)[1] if ":" in peer else peer
    return address.rsplit(":", 1)[0].strip("[]") or "unknown"


class _Status(Exception):
    """End the RPC with this exact status (the caller's deadline, a decoupled model over ModelInfer)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(slots=True)
class _Call:
    """What one RPC did, for its metric, log line and span."""

    method: str
    request_id: str
    info: RequestInfo
    code: grpc.StatusCode = grpc.StatusCode.OK


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def _server_span(method: str, metadata: Mapping[str, str]) -> contextlib.AbstractContextManager[Any]:
    return tracing.rpc_server_span(SERVICE, method, metadata)


def _finish(call: _Call, start: float, span: Any) -> None:
    elapsed = time.perf_counter() - start
    metrics.grpc_request(call.method, call.code.name, elapsed)
    if span is not None:
        span.set_attribute("rpc.grpc.status_code", call.code.value[0])
        span.set_attribute("tgw.request_id", call.request_id)
    level = logging.DEBUG if call.method in _QUIET else logging.INFO
    if access_logger.isEnabledFor(level):
        fields: dict[str, Any] = {
            "request_id": call.request_id, "method": "gRPC", "path": f"/{SERVICE}/{call.method}",
            "status": call.code.name, "duration_ms": round(elapsed * 1000, 2),
        }  # fmt: skip
        if call.info.model is not None:
            fields["model"], fields["version"] = call.info.model, call.info.version
        if call.info.cache is not None:
            fields["cache"] = call.info.cache
        access_logger.log(level, "request", extra=fields)


def _error_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, _Status):
        return exc.code, exc.message
    if isinstance(exc, GatewayError):
        log_gateway_error(exc)
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
        start = time.perf_counter()
        meta = _metadata(context)
        call = _Call(name, set_request_id(getattr(request, "id", "") or meta.get("x-request-id")),
                     begin_request())  # fmt: skip
        failure: tuple[grpc.StatusCode, str] | None = None
        principal: Principal | None = None
        with _server_span(name, meta) as span:
            try:
                principal = await self.admit(name, meta, context)
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
                _finish(call, start, span)
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
        triton: service_pb2_grpc.GRPCInferenceServiceStub, triton_version: Callable[[], Awaitable[str]],
        admin_timeout_s: float, auth: AuthStage | None = None,
    ) -> None:  # fmt: skip
        self.inference = inference
        self.registry = registry
        self.health = health
        self.triton = triton
        self.triton_version = triton_version
        self.admin_timeout_s = admin_timeout_s
        self.auth = auth

    async def admit(self, method: str, metadata: Mapping[str, str], context: grpc.aio.ServicerContext) -> Any:
        """THE authentication point of the gRPC front door: the caller's key from the call metadata
        (``authorization: Bearer …`` / ``x-api-key``, as HTTP headers), its limits taken; raises 401 ->
        UNAUTHENTICATED, 403 -> PERMISSION_DENIED, 429 -> RESOURCE_EXHAUSTED. Returns the principal to
        ``release`` when the call is over (None: nothing to release)."""
        if self.auth is None or method in OPEN_RPCS:
            return None
        return await self.auth.admit_headers(metadata, _peer_address(context), admin=method in ADMIN_RPCS)

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

    # --- relayed to Triton as they are -------------------------------------------------------------
    @unary
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        served = self.inference.served
        if served is None:  # relayed as it is
            metadata = (("x-request-id", call.request_id),)
            return await self.triton.ModelStatistics(request, timeout=self.admin_timeout_s, metadata=metadata)
        stats = await served.answer(request.name, request.version)  # as /v2/.../stats answers them
        response = service_pb2.ModelStatisticsResponse()
        return json_format.ParseDict(stats, response, ignore_unknown_fields=True)

    @unary
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        return await self.triton.RepositoryIndex(request, timeout=self.admin_timeout_s,
                                                 metadata=(("x-request-id", call.request_id),))  # fmt: skip

    # --- inference ---------------------------------------------------------------------------------
    @unary
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext, call: _Call) -> Any:
        response = await self._infer(request, call.request_id, context.time_remaining())
        context.set_trailing_metadata((("x-request-id", call.request_id), ("x-cache", response.cache)))
        return codec.encode(response, request.id)

    async def _infer(self, request: Any, request_id: str, remaining_s: float | None) -> InferResponse:
        info = await self.inference.resolve(request.model_name, request.model_version or None)
        if info.decoupled:  # as Triton answers it: such a model may send any number of responses
            raise _Status(grpc.StatusCode.UNIMPLEMENTED, "ModelInfer RPC doesn't support models with "
                          "decoupled transaction policy; use ModelStreamInfer")  # fmt: skip
        decoded = codec.decode(info, request)
        decoded.request.request_id = request_id
        apply_principal(decoded.request, current_principal())  # the key's tier: priority, timeout, scope
        if remaining_s is None:
            return await self.inference.infer(decoded.request)
        try:
            async with asyncio.timeout(remaining_s):
                return await self.inference.infer(decoded.request)
        except TimeoutError:
            raise _Status(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded waiting for Triton") from None

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[Any], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        start = time.perf_counter()
        meta = _metadata(context)
        call = _Call("ModelStreamInfer", set_request_id(meta.get("x-request-id")), begin_request())
        with _server_span(call.method, meta) as span:
            try:  # one admission per stream: the key's limits count the stream as one request
                principal = await self.admit(call.method, meta, context)
            except Exception as exc:
                call.code, message = _error_status(exc)
                _finish(call, start, span)
                await context.abort(call.code, message)
            stream = _Stream(self, meta, principal)
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
                _finish(call, start, span)

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


_END = object()


class _Stream:
    """One ModelStreamInfer call: ordinary requests through the pipeline (answered in order), decoupled
    and sequence requests relayed on one upstream stream to Triton."""

    def __init__(self, servicer: Servicer, metadata: Mapping[str, str], principal: Any = None) -> None:
        self.servicer = servicer
        self.principal = principal
        self.metadata = tuple((k, v) for k, v in metadata.items() if k in ("x-request-id", "traceparent"))
        self.out: asyncio.Queue[Any] = asyncio.Queue()
        self.upstream: Any = None  # grpc.aio.StreamStreamCall to Triton, opened on the first relayed request
        self.relay: asyncio.Task[None] | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    async def run(self, requests: AsyncIterator[Any]) -> AsyncIterator[service_pb2.ModelStreamInferResponse]:
        reader = asyncio.create_task(self._read(requests))
        self.tasks.add(reader)
        while True:
            item = await self.out.get()
            if item is _END:
                break
            yield (await item) if isinstance(item, asyncio.Future) else item
        await reader  # re-raises a failure of the reader

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for request in requests:
                await self._accept(request)
            if self.upstream is not None:
                await self.upstream.done_writing()
                assert self.relay is not None
                await self.relay
        finally:
            self.out.put_nowait(_END)

    async def _accept(self, request: Any) -> None:
        rid = set_request_id(request.id or None)
        try:
            info = await self.servicer.inference.resolve(request.model_name, request.model_version or None)
            decoded = codec.decode(info, request)
            decoded.request.request_id = rid
            apply_principal(decoded.request, self.principal)
        except GatewayError as exc:
            log_gateway_error(exc)
            self.out.put_nowait(codec.error_response(exc.message, request.id))
            return
        if info.decoupled or decoded.options.sequence:
            await self._relay(request)
            return
        task = asyncio.ensure_future(self._answer(decoded, request.id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.out.put_nowait(task)

    async def _answer(self, decoded: codec.GrpcRequest, client_id: str) -> Any:
        try:
            response = await self.servicer.inference.infer(decoded.request)
        except GatewayError as exc:
            log_gateway_error(exc)
            return codec.error_response(exc.message, client_id)
        return service_pb2.ModelStreamInferResponse(infer_response=codec.encode(response, client_id))

    async def _relay(self, request: Any) -> None:
        if self.upstream is None:
            self.upstream = self.servicer.triton.ModelStreamInfer(metadata=self.metadata)
            self.relay = asyncio.create_task(self._pump())
        await self.upstream.write(request)

    async def _pump(self) -> None:
        async for response in self.upstream:
            self.out.put_nowait(response)

    async def close(self) -> None:
        if self.upstream is not None:
            self.upstream.cancel()
        for task in list(self.tasks):
            task.cancel()
        if self.relay is not None:
            self.relay.cancel()


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

    def __init__(self, settings: Settings, gateway: Gateway, auth: AuthStage | None = None) -> None:
        self.settings = settings
        limit = settings.grpc_max_message_bytes
        options = [*_CHANNEL_OPTIONS, ("grpc.max_send_message_length", limit),
                   ("grpc.max_receive_message_length", limit)]  # fmt: skip
        self.channel = grpc.aio.insecure_channel(settings.triton_grpc_address, options=options)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.servicer = Servicer(gateway.inference, gateway.registry, gateway.health, stub,
                                 _triton_version(gateway.admin), admin_timeout_s=5.0, auth=auth)  # fmt: skip
        self.server = grpc.aio.server(options=options)
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(self.servicer, self.server)
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
        await self.channel.close()
