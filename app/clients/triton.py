"""Triton over gRPC (``tritonclient.grpc.aio``): the admin interface (health, metadata, config, index,
statistics) and inference when ``TGW_TRITON_HTTP_URL`` is unset. Channels are created once, in
``build_gateway``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from app.clients.grpc_status import from_grpc, grpc_status_from_text
from app.clients.protocols import TritonCall, TritonResult
from app.clients.tensors import set_parameter, tensor_bytes
from app.errors import GatewayError
from app.observability import tracing

logger = logging.getLogger(__name__)
T = TypeVar("T")

_MAX_MESSAGE = 256 * 1024 * 1024
# How long a keepalive ping waits for its ack before the channel is taken for dead (was the setting
# TGW_TRITON_GRPC_KEEPALIVE_TIMEOUT_S: nothing an operator tunes; the interval and without-calls are).
KEEPALIVE_ACK_TIMEOUT_S = 20.0
# Idle ModelStreamInfer streams kept per Triton for the next streamed request (``TritonGrpcClient.stream``),
# and how long one is kept unused: below Triton's keepalive bound on calls without data (5 min).
STREAM_POOL = 16
STREAM_IDLE_S = 60.0


def channel_args(
    keepalive_s: float = 360.0,
    keepalive_timeout_s: float = KEEPALIVE_ACK_TIMEOUT_S,
    without_calls: bool = False,
) -> list[tuple[str, int]]:
    """gRPC channel options that Triton's server-side keepalive policy accepts.

    Triton's defaults (``tritonserver --help``): ``--grpc-keepalive-permit-without-calls=0``,
    ``--grpc-http2-min-recv-ping-interval-without-data=300000`` (5 min) and
    ``--grpc-http2-max-ping-strikes=2``: a client that pings while idle, or more often than every 5 min
    without data, gets ``GOAWAY ENHANCE_YOUR_CALM "too_many_pings"`` after two strikes. So by default: no
    pings without calls, a ping interval (6 min) above the server's minimum, and at most 2 pings without
    data (gRPC's own default). Pings only matter to find a dead peer during a long call; the inference
    deadline bounds those anyway.
    """
    return [
        ("grpc.max_send_message_length", _MAX_MESSAGE),
        ("grpc.max_receive_message_length", _MAX_MESSAGE),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1 if without_calls else 0),
        ("grpc.http2.max_pings_without_data", 2),
        # Fail fast while Triton is down, so the 503 answer is quick and the retry loop decides.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def settings_channel_args(settings: Any) -> list[tuple[str, int]]:
    """``channel_args`` from the ``TGW_TRITON_GRPC_KEEPALIVE_*`` settings (``Settings.triton``)."""
    return channel_args(
        settings.triton_grpc_keepalive_s,
        KEEPALIVE_ACK_TIMEOUT_S,
        settings.triton_grpc_keepalive_without_calls,
    )


_CONNECT_FAILURES = ("failed to connect", "connection refused", "connections to all backends failing",
                     "name resolution", "dns resolution")  # fmt: skip


def _not_sent(exc: InferenceServerException) -> bool:
    text = f"{exc.message()} {exc.debug_details() or ''}".lower()
    return any(marker in text for marker in _CONNECT_FAILURES)


_INTEGERS = frozenset({
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64,
})  # fmt: skip


# Fields of the client's protos that Triton 2.51 (the embedded server) does not know, by message: such
# a server's HTTP API never writes them, so its answer leaves them out while they hold their default.
UNKNOWN_TO_2_51: dict[str, frozenset[str]] = {
    "inference.ModelEnsembling": frozenset({"max_inflight_requests"})
}


def proto_json(message: Message, omit_defaults: Mapping[str, frozenset[str]] | None = None) -> dict[str, Any]:
    """A protobuf message as Triton's HTTP API writes it: field names as in the .proto, every field (zero
    values too), 64-bit integers as JSON numbers (protobuf's JSON mapping makes them strings), and map
    entries sorted by key (protobuf's map order differs from process to process: the same config read by
    two workers would otherwise give two bodies). ``omit_defaults``: per message, fields left out while
    they hold their default (fields the server does not know)."""
    out = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _numbers(message.DESCRIPTOR, out, omit_defaults or {})
    return out


def _numbers(descriptor: Any, obj: dict[str, Any], omit: Mapping[str, frozenset[str]]) -> None:
    for name in omit.get(descriptor.full_name, ()):
        if name in obj and not obj[name]:
            del obj[name]
    for field in descriptor.fields:
        if field.name not in obj:
            continue
        value = obj[field.name]
        if field.type in _INTEGERS:
            obj[field.name] = [int(v) for v in value] if isinstance(value, list) else int(value)
        elif field.message_type is not None:
            if field.message_type.GetOptions().map_entry:
                obj[field.name] = value = dict(sorted(value.items()))
                inner = field.message_type.fields_by_name["value"]
                if inner.message_type is not None:
                    for item in value.values():
                        _numbers(inner.message_type, item, omit)
                continue
            for item in value if isinstance(value, list) else [value]:
                _numbers(field.message_type, item, omit)


class TritonGrpcClient:
    """``TritonAdmin``, and an ``InferenceTransport`` (inference over gRPC), on ``channels`` independent
    gRPC channels used round-robin."""

    def __init__(
        self, url: str, channels: int = 1, retries: int = 2, retry_after_s: int = 2,
        admin_timeout_s: float = 5.0, args: list[tuple[str, int]] | None = None,
    ) -> None:  # fmt: skip
        self.url = url
        options = args if args is not None else channel_args()
        self._clients = [
            grpcclient.InferenceServerClient(url, channel_args=list(options)) for _ in range(channels)
        ]
        self._next = itertools.cycle(self._clients)
        self._retries = retries
        self._retry_after_s = retry_after_s
        self._admin_timeout_s = admin_timeout_s
        self._server_version: tuple[int, ...] | None = None
        self._options = list(options)
        self._stream_channel: grpc.aio.Channel | None = None  # streams: opened at the first one
        self._stream_service: service_pb2_grpc.GRPCInferenceServiceStub | None = None
        self._idle_streams: list[tuple[Any, float]] = []  # (stream, idle since): the newest last
        self._closing: set[asyncio.Task[None]] = set()

    def _map(self, exc: InferenceServerException) -> GatewayError:
        status = grpc_status_from_text(exc.status())
        return from_grpc(status, exc.message() or str(exc), self._retry_after_s)

    async def _call(self, fn: Callable[[grpcclient.InferenceServerClient], Awaitable[T]]) -> T:
        """Run one RPC; retry only on UNAVAILABLE raised while connecting, i.e. the request never left
        (an UNAVAILABLE after the stream was open may have reached Triton and is not retried)."""
        attempt = 0
        while True:
            client = next(self._next)
            try:
                return await fn(client)
            except InferenceServerException as exc:
                status = grpc_status_from_text(exc.status())
                if status is grpc.StatusCode.UNAVAILABLE and attempt < self._retries and _not_sent(exc):
                    attempt += 1
                    await asyncio.sleep(0.05 * attempt)
                    continue
                raise self._map(exc) from None

    async def server_live(self) -> bool:
        try:
            return bool(await self._call(lambda c: c.is_server_live(client_timeout=self._admin_timeout_s)))
        except GatewayError:
            return False

    async def server_ready(self) -> bool:
        try:
            return bool(await self._call(lambda c: c.is_server_ready(client_timeout=self._admin_timeout_s)))
        except GatewayError:
            return False

    async def server_metadata(self) -> dict[str, Any]:
        out = await self._call(
            lambda c: c.get_server_metadata(as_json=True, client_timeout=self._admin_timeout_s)
        )
        return dict(out)

    async def repository_index(self) -> list[dict[str, Any]]:
        out = await self._call(
            lambda c: c.get_model_repository_index(as_json=True, client_timeout=self._admin_timeout_s)
        )
        return list(out.get("models", []))

    async def model_metadata(self, model: str, version: str = "") -> dict[str, Any]:
        out = await self._call(
            lambda c: c.get_model_metadata(model, version, as_json=True, client_timeout=self._admin_timeout_s)
        )
        return dict(out)

    async def model_config(self, model: str, version: str = "") -> dict[str, Any]:
        """The config as Triton's HTTP API writes it (``proto_json``)."""
        out = await self._call(
            lambda c: c.get_model_config(model, version, client_timeout=self._admin_timeout_s)
        )
        return proto_json(out.config, UNKNOWN_TO_2_51 if await self._server_is_2_51() else None)

    async def _server_is_2_51(self) -> bool:
        """Whether the server is Triton 2.51 or older (or says no version): read once."""
        if self._server_version is None:
            version = str((await self.server_metadata()).get("version", ""))
            self._server_version = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
        return self._server_version <= (2, 51)

    async def model_statistics(self, model: str = "", version: str = "") -> dict[str, Any]:
        """Triton's inference statistics (all models when ``model`` is empty), as its HTTP API shows them."""
        out = await self._call(
            lambda c: c.get_inference_statistics(model, version, client_timeout=self._admin_timeout_s)
        )
        return proto_json(out)

    # --- InferenceTransport ---
    async def live(self) -> bool:
        return await self.server_live()

    async def infer(self, call: TritonCall) -> TritonResult:
        """One unary ModelInfer through tritonclient (its request builder and reserved-parameter checks).
        Building the protobuf by hand was measured and did not pay (docs/performance.md)."""
        infer_inputs = []
        for name, array in call.inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), call.datatypes[name])
            tensor.set_data_from_numpy(array)
            infer_inputs.append(tensor)
        top = call.classification
        requested = (
            [grpcclient.InferRequestedOutput(name, class_count=top.get(name, 0)) for name in call.outputs]
            if call.outputs
            else None
        )
        rid = call.request_id
        headers = {"x-request-id": rid} if rid else {}
        tracing.inject(headers)  # W3C traceparent as gRPC metadata; no-op unless tracing is on
        result = await self._call(
            lambda c: c.infer(
                call.model,
                infer_inputs,
                model_version=call.version,
                outputs=requested,
                request_id=rid,
                sequence_id=call.options.sequence_id,
                sequence_start=call.options.sequence_start,
                sequence_end=call.options.sequence_end,
                priority=call.options.priority,
                timeout=call.options.timeout_us or None,
                parameters=dict(call.parameters) if call.parameters else None,
                client_timeout=call.remaining_s(),
                headers=headers or None,
            )
        )
        return _result(result)

    def _stream_stub(self) -> service_pb2_grpc.GRPCInferenceServiceStub:
        if self._stream_channel is None:
            self._stream_channel = grpc.aio.insecure_channel(self.url, options=self._options)
            self._stream_service = service_pb2_grpc.GRPCInferenceServiceStub(self._stream_channel)
        assert self._stream_service is not None
        return self._stream_service

    def _idle_stream(self) -> Any | None:
        """A ``ModelStreamInfer`` stream that carried an earlier request to its end, ready for the next."""
        now = time.monotonic()
        while self._idle_streams:
            rpc, since = self._idle_streams.pop()
            if not rpc.done() and now - since < STREAM_IDLE_S:
                return rpc
            self._retire(rpc)
        return None

    def _retire(self, rpc: Any) -> None:
        """An idle stream not kept: half-closed (no request is in flight on it), its end read away."""
        if rpc.done():
            return

        async def close() -> None:
            with contextlib.suppress(Exception):
                await rpc.done_writing()
                while await rpc.read() is not grpc.aio.EOF:
                    pass
            rpc.cancel()

        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def stream(self, call: TritonCall) -> AsyncIterator[TritonResult]:
        """``call``'s responses on a ``ModelStreamInfer`` stream, each yielded as it comes.

        One request at a time on a stream: Triton 2.51 aborts (``proto_buffer_writer.h`` assertion) when a
        decoupled model's responses interleave with others on one stream. Opening a stream costs a round
        of HTTP/2 frames and grpc.aio work (0.3-0.6 ms of the first response at c=1 on a 2-core box,
        docs/performance.md), so a stream that carried its request to Triton's final response goes back to
        a small pool of idle streams for the next request (tritonclient's and perf_analyzer's way: many
        requests, one after the other, on one stream); the request id travels in the request (its ``id``).
        Triton's empty final response is always asked for, and a stream is half-closed only when idle:
        Triton 2.51 crashed (SIGSEGV in ``TRITONBACKEND_ResponseSend``, about once in six loaded runs) when
        a stream was half-closed while a decoupled model still sent on it. The deadline is the gateway's
        (``call.deadline``, on every read). Leaving the loop early (the client went away), the deadline or
        an error cancels the stream, which Triton passes on to the model as a cancelled request; such a
        stream is never reused. A traced call (a ``traceparent`` to send) gets a stream of its own, once."""
        message = stream_request(call)
        metadata: dict[str, str] = {}
        tracing.inject(metadata)
        rpc = None if metadata else self._idle_stream()
        finished = False
        try:
            if rpc is not None:
                try:
                    response = await self._send(rpc, message, call)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError, _Ended) as exc:
                    # an idle stream that had ended meanwhile (Triton restarted, the connection dropped)
                    # before any response: sent again on a fresh one (a stream is retried only before
                    # its first response)
                    logger.debug("an idle Triton stream had ended (%s): opening another", exc)
                    rpc.cancel()
                    rpc = None
            if rpc is None:
                rpc = self._stream_stub().ModelStreamInfer(metadata=tuple(metadata.items()))
                response = await self._send(rpc, message, call)
            while True:
                if response.error_message:
                    raise from_grpc(None, response.error_message, self._retry_after_s)
                result = self._streamed(response.infer_response)
                if result.final:
                    finished = True
                    self._release(rpc, response.infer_response, reusable=not metadata)
                yield result
                if finished:
                    return
                response = await self._read(rpc, call)
        except _Ended as exc:
            raise from_grpc(exc.code, exc.details, self._retry_after_s) from None
        except TimeoutError:
            raise from_grpc(
                grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", self._retry_after_s
            ) from None
        except grpc.aio.AioRpcError as exc:
            raise from_grpc(exc.code(), exc.details() or exc.code().name, self._retry_after_s) from None
        finally:
            if not finished and rpc is not None:
                rpc.cancel()

    def _release(self, rpc: Any, final: service_pb2.ModelInferResponse, reusable: bool) -> None:
        """A stream whose request got its final response: pooled for the next request when Triton said so
        (its final flag) and it may be lent (not traced: its traceparent was this request's) and there is
        room, else half-closed; cancelled without Triton's flag (something may still come on it)."""
        flag = final.parameters.get("triton_final_response")
        if flag is None or not flag.bool_param:
            rpc.cancel()
        elif reusable and len(self._idle_streams) < STREAM_POOL:
            self._idle_streams.append((rpc, time.monotonic()))
        else:
            self._retire(rpc)

    async def _send(
        self, rpc: Any, message: service_pb2.ModelInferRequest, call: TritonCall
    ) -> service_pb2.ModelStreamInferResponse:
        """``message`` written on ``rpc``; its first response."""
        await rpc.write(message)
        return await self._read(rpc, call)

    @staticmethod
    async def _read(rpc: Any, call: TritonCall) -> service_pb2.ModelStreamInferResponse:
        """The stream's next response, within ``call``'s deadline (the whole stream's, not each read's);
        ``_Ended`` if Triton ended the stream."""
        left = call.deadline - time.monotonic() if call.deadline else None
        if left is not None and left <= 0:
            raise TimeoutError
        async with asyncio.timeout(left):
            response = await rpc.read()
        if response is grpc.aio.EOF:  # the stream ended before Triton's final response
            raise _Ended(await rpc.code(), await rpc.details() or "Triton ended the stream")
        return response

    @staticmethod
    def _streamed(response: service_pb2.ModelInferResponse) -> TritonResult:
        final = response.parameters.get("triton_final_response")
        if not response.outputs:
            return TritonResult(response.model_version, {}, {}, final=final is None or final.bool_param)
        return _result(grpcclient.InferResult(response), final=final is not None and final.bool_param)

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        while self._idle_streams:
            self._idle_streams.pop()[0].cancel()
        if self._stream_channel is not None:
            await self._stream_channel.close()


class _Ended(Exception):
    """Triton ended a ``ModelStreamInfer`` stream (its status) before the request's final response."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


def _result(result: grpcclient.InferResult, final: bool = True) -> TritonResult:
    """Triton's answer as arrays (tritonclient decodes raw and typed contents alike)."""
    response = result.get_response()
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for out in response.outputs:
        arr = result.as_numpy(out.name)
        if arr is not None:
            arrays[out.name] = arr
            dtypes[out.name] = out.datatype
    return TritonResult(response.model_version, arrays, dtypes, final=final)


def stream_request(call: TritonCall) -> service_pb2.ModelInferRequest:
    """The ``ModelInferRequest`` of ``call`` for a stream, built from the validated call only (never from
    a client's bytes: nothing the gateway did not validate, such as a tensor's ``shared_memory_region``
    parameter, reaches Triton), asking for Triton's empty final response."""
    msg = service_pb2.ModelInferRequest(model_name=call.model, model_version=call.version, id=call.request_id)
    for name, array in call.inputs.items():
        msg.inputs.add(name=name, datatype=call.datatypes[name], shape=array.shape)
        msg.raw_input_contents.append(tensor_bytes(array))
    for name in call.outputs or ():
        output = msg.outputs.add(name=name)
        if name in call.classification:  # Triton's classification extension
            output.parameters["classification"].int64_param = call.classification[name]
    params = msg.parameters
    for key, value in call.parameters.items():
        set_parameter(params[key], value)
    options = call.options
    if options.sequence_id:
        set_parameter(params["sequence_id"], options.sequence_id)
        params["sequence_start"].bool_param = options.sequence_start
        params["sequence_end"].bool_param = options.sequence_end
    if options.priority:
        params["priority"].uint64_param = options.priority
    if options.timeout_us:
        params["timeout"].int64_param = options.timeout_us
    params["triton_enable_empty_final_response"].bool_param = True
    return msg
