"""WebSockets of the jobs service: ``/v1/jobs/{id}/ws`` (one job's events, then its result, then close
1000) and ``/v1/ws`` (one socket, many requests: ``infer`` and ``subscribe`` frames, answers tagged with
``ref``/``job_id``). The routers only accept the socket and hand it here.

A decoupled model's ``infer`` frame is streamed (``Multiplexer._stream``): one ``stream`` frame per
response (``seq``, ``final``, ``cache``), cancelled in Triton by ``{"op":"cancel","ref":…}`` (then a
``cancelled`` frame) or by the socket closing.

Each socket has its own bounded outbox drained by its own sender task; producers only ``put_nowait``, so
a slow client cannot hold up anyone else. A client that falls ``TGW_WS_SEND_QUEUE`` frames behind is
closed with 1008. A stream's frames are the exception: they wait for room below half the outbox
(``Outbox.room``), so a stream never overflows it, and when its client stops reading the stream's own
bounded buffer overflows instead (``stream_overflow``: cancelled in Triton). Heartbeat frames
``{"type": "heartbeat"}`` go out every ``TGW_WS_HEARTBEAT_S``.
Job subscriptions are pushed on change by the process's one Redis subscription (``events.EventHub``).
A socket of a key that is revoked or rotated away is closed (1008) within ``TGW_AUTH_KEY_CACHE_S``: the
key is checked again on every client frame and about every second (``AuthStage.recheck``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from app.domain import InferRequest, ModelInfo, json_values
from app.errors import GatewayError, InvalidInput, NotFound, PayloadTooLarge, UpstreamError
from app.observability import metrics
from app.observability.requests import WS_ROUTE, Requests
from app.request_context import Caller, RequestContext, request_id_for
from app.services.inference import InferenceService
from app.services.jobs.service import JobService, result_json
from app.services.offload import INLINE, Offload
from app.services.payload import ANY_MODEL, parse_json
from app.services.streams import ResponseStream
from app.services.validation import container_budget, validate_v1_body

logger = logging.getLogger(__name__)

_MODEL_NAME = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')
# The ``ref`` of a large frame that is refused unread (too large, over the key's rate), looked for in its
# first and last REF_SCAN_BYTES only: a string (escapes allowed) or a number.
REF_SCAN_BYTES = 4096
_REF = re.compile(r'"ref"\s*:\s*("(?:[^"\\]|\\.){0,256}"|-?\d{1,30})')
_INFER_FIELDS = {"op", "ref", "model", "version", "inputs", "outputs", "parameters"}
_BODY_FIELDS = ("inputs", "outputs", "parameters")
_FRAME_TAGS = frozenset({"op", "ref", "model", "version", "job_id"})


@dataclass(slots=True)
class DecodedFrame:
    """A large client frame as ``decode_frame`` parsed it: the frame without its tensors, and its request
    decoded for the model the frame was scanned for (when it is an infer frame for that model)."""

    frame: Any  # the frame less its tensors (other fields: names only); None when not a JSON object
    decoded_for: tuple[str, str] | None  # (model, version) the request was decoded for
    request: InferRequest | None = None
    error: GatewayError | None = None  # what decoding raised: answered in order, with the frame's tags


def decode_frame(data: bytes, info: ModelInfo | None) -> DecodedFrame:
    """Parse a large ``/v1/ws`` frame (within the bounds of ``info``'s tensors when the model is known) and
    decode its request for ``info``. Runs in a child process (``app.services.offload``): only the small parts
    of the frame and the decoded tensors cross back, never the frame's lists."""
    frame = parse_json(
        data, containers=container_budget(info) if info is not None else ANY_MODEL, what="frame"
    )
    if not isinstance(frame, dict):
        return DecodedFrame(None, None)
    head = {k: v if k in _FRAME_TAGS else None for k, v in frame.items() if k not in _BODY_FIELDS}
    if info is None or frame.get("op") != "infer" or frame.get("model") != info.name:
        return DecodedFrame(head, None)
    try:
        request = validate_v1_body(info, {k: frame[k] for k in _BODY_FIELDS if k in frame})
    except GatewayError as exc:
        return DecodedFrame(head, (info.name, info.version), error=exc)
    return DecodedFrame(head, (info.name, info.version), request)


class Socket(Protocol):
    """What these sockets use of an accepted WebSocket (the routers' ``starlette.websockets.WebSocket``)."""

    async def receive(self) -> MutableMapping[str, Any]: ...

    async def send_text(self, data: str) -> None: ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


class Recheck(Protocol):
    """The key a socket was opened with, checked again while it lives (``app.auth.asgi.KeyCheck``, handed
    over by the door; None without a key to revoke)."""

    async def frame(self) -> bool: ...

    async def admit(self) -> None: ...  # the frame counts against the key's request rate (raises over it)

    async def revoked(self) -> None: ...


class TooManyInFlight(GatewayError, status=429, code="too_many_in_flight"):
    pass


@dataclass(slots=True)
class Streaming:
    """A decoupled model's request streaming on a ``/v1/ws`` socket, under its ``ref`` (what
    ``{"op":"cancel","ref":…}`` finds): the frame's task, its stream once open, the frames sent."""

    task: asyncio.Task[Any] | None
    stream: ResponseStream | None = None
    sent: int = 0
    cancelled: bool = False  # by a cancel frame (not by the socket closing)


def _ref_key(ref: Any) -> bytes:
    """A ``ref`` as a key of the socket's streams: its JSON (``1`` and ``"1"`` are different refs)."""
    return orjson.dumps(ref)


class Outbox:
    def __init__(self, ws: Socket, maxsize: int) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize)
        self.overflowed = False
        self._sent: asyncio.Event | None = None  # set as each frame leaves the queue (for ``room``)
        self.task = asyncio.create_task(self._run())

    async def room(self, below: int) -> None:
        """Until fewer than ``below`` frames are queued: a stream's frames wait here, so a stream fills at
        most ``below`` of the outbox and the rest stays free for the frames that cannot wait (results,
        errors, job events, heartbeats). Waiters are woken in the order they waited: streams take turns."""
        while self.queue.qsize() >= below and not self.overflowed:
            if self._sent is None:
                self._sent = asyncio.Event()
            self._sent.clear()
            await self._sent.wait()

    def emit(self, frame: dict[str, Any]) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(orjson.dumps(frame, option=orjson.OPT_SERIALIZE_NUMPY).decode())
        except asyncio.QueueFull:
            self.overflowed = True
            self.task.cancel()

    async def _run(self) -> None:
        while (item := await self.queue.get()) is not None:
            if self._sent is not None:
                self._sent.set()
            await self.ws.send_text(item)

    async def flush_and_stop(self, timeout_s: float = 10.0) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(timeout_s):
                await self.queue.put(None)
                await self.task


def error_frame(exc: GatewayError, **tags: Any) -> dict[str, Any]:
    return {
        "type": "error",
        **tags,
        "error": {"code": exc.code, "message": exc.message, "details": exc.details},
    }


async def _heartbeat(outbox: Outbox, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        outbox.emit({"type": "heartbeat"})


async def _until_disconnect(ws: Socket) -> None:
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass


async def _close_revoked(ws: Socket) -> None:
    with contextlib.suppress(Exception):
        await ws.close(1008, "API key revoked or rotated")


def _ref(tags: dict[str, Any]) -> str | None:
    """A frame's ``ref`` as a candidate request id (the rule for ``X-Request-ID`` then applies to it)."""
    ref = tags.get("ref")
    return str(ref) if isinstance(ref, str | int) and not isinstance(ref, bool) else None


class SocketLimits:
    def __init__(self, send_queue: int, heartbeat_s: float, max_in_flight: int, max_frame: int) -> None:
        self.send_queue, self.heartbeat_s = send_queue, heartbeat_s
        self.max_in_flight, self.max_frame = max_in_flight, max_frame


class JobSockets:
    """Serves the job WebSockets of one process; counts them (``/v1/jobs/stats``, ``tgw_websockets_open``)."""

    def __init__(
        self,
        service: JobService,
        inference: InferenceService,
        limits: SocketLimits,
        offload: Offload = INLINE,
        requests: Requests | None = None,
    ) -> None:
        self.service = service
        self.inference = inference
        self.limits = limits
        self.offload = offload
        self.requests = requests or Requests()  # each /v1/ws request frame's metrics and access-log line

    def _count(self, delta: int) -> None:
        self.service.websockets_open += delta
        (metrics.websocket_opened if delta > 0 else metrics.websocket_closed)()

    async def serve_job(self, ws: Socket, owner: str, job_id: str, *, check: Recheck | None) -> None:
        """``/v1/jobs/{id}/ws`` on an accepted socket."""
        self._count(+1)
        outbox = Outbox(ws, self.limits.send_queue)
        watcher = asyncio.create_task(self.service.watch(owner, job_id, outbox.emit))
        others = [
            asyncio.create_task(_until_disconnect(ws)),
            asyncio.create_task(_heartbeat(outbox, self.limits.heartbeat_s)),
        ]
        if check is not None:
            others.append(asyncio.create_task(check.revoked()))
        try:
            ends = [watcher, outbox.task, others[0], *others[2:]]
            await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            if others[2:] and others[2].done():
                outbox.task.cancel()
                await _close_revoked(ws)
            elif watcher.done() and not watcher.cancelled() and watcher.exception() is None:
                await outbox.flush_and_stop()
                with contextlib.suppress(Exception):
                    await ws.close(1000 if watcher.result() else 4404)
            elif outbox.overflowed:
                with contextlib.suppress(Exception):
                    await ws.close(1008, "client too slow")
        finally:
            self._count(-1)
            for task in (watcher, outbox.task, *others):
                task.cancel()

    async def serve_multiplexed(
        self, ws: Socket, owner: str, *, check: Recheck | None, caller: Caller | None
    ) -> None:
        """``/v1/ws`` on an accepted socket; ``caller``: the socket's key (each frame's ``RequestContext``
        carries it to the core: its tier's priority and timeout bound, its cache scope)."""
        self._count(+1)
        outbox = Outbox(ws, self.limits.send_queue)
        mux = Multiplexer(
            self.service, self.inference, owner, self.limits, outbox, caller, self.offload, self.requests
        )
        beat = asyncio.create_task(_heartbeat(outbox, self.limits.heartbeat_s))
        revoked = asyncio.create_task(check.revoked()) if check is not None else None
        ends = [outbox.task] if revoked is None else [outbox.task, revoked]
        gone = False  # the key was revoked or rotated away
        try:
            while not outbox.overflowed:
                receive = asyncio.create_task(ws.receive())
                await asyncio.wait([receive, *ends], return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():
                    receive.cancel()
                    gone = revoked is not None and revoked.done()
                    break
                msg = receive.result()
                if msg["type"] == "websocket.disconnect":
                    break
                if check is not None and not await check.frame():
                    gone = True
                    break
                text = msg.get("text")
                if text is None:
                    text = (msg.get("bytes") or b"").decode("utf-8", "replace")
                if check is not None:
                    try:
                        await check.admit()  # over the key's rate: refused like any other frame
                    except GatewayError as exc:
                        mux.refuse(text, exc)
                        continue
                mux.handle(text)
            if gone:  # nothing more is answered
                for task in (outbox.task, *mux.tasks):
                    task.cancel()
                await _close_revoked(ws)
            elif outbox.overflowed:
                with contextlib.suppress(Exception):
                    await ws.close(1008, "client too slow")
        finally:
            self._count(-1)
            for task in (beat, outbox.task, *mux.tasks, *ends[1:]):
                task.cancel()


class Multiplexer:
    """State of one ``/v1/ws`` socket. Every request frame (``infer``, or a frame refused before it is
    one: too large, not JSON, an unknown ``op``, over the in-flight bound) is recorded as a request of
    the socket's route once answered (``Requests.frame``: counter, latency, access-log line); a stream
    once it ended (200 complete, 499 cancelled). ``cancel`` and ``ping`` frames are not requests."""

    def __init__(
        self, service: JobService, inference: InferenceService, owner: str, limits: SocketLimits,
        outbox: Outbox, caller: Caller | None = None, offload: Offload = INLINE,
        requests: Requests | None = None,
    ) -> None:  # fmt: skip
        self.service, self.inference, self.owner = service, inference, owner
        self.max_in_flight, self.max_frame, self.outbox = limits.max_in_flight, limits.max_frame, outbox
        self.caller = caller
        self.offload = offload
        self.large = offload.in_place_bytes  # larger frames are parsed (and decoded) off the loop
        self.tasks: set[asyncio.Task[None]] = set()
        self.requests = requests or Requests()
        self.streams: dict[bytes, Streaming] = {}  # streams in flight, by their frame's ``ref``
        self.stream_share = max(1, limits.send_queue // 2)  # outbox frames a stream's frames wait below

    def _refuse(self, exc: GatewayError, start: float, tags: dict[str, Any]) -> None:
        """Answer a request frame with ``exc`` and record it."""
        rid = request_id_for(_ref(tags))  # not the socket task's current id
        self.outbox.emit(error_frame(exc, **tags, request_id=rid))
        self.requests.begin("frame", "GET", WS_ROUTE, rid, start=start).end(exc.status_code)

    def refuse(self, text: str, exc: GatewayError) -> None:
        """Answer a frame refused before it is read (over the key's rate) with ``exc``, under its ``ref``."""
        self._refuse(exc, time.perf_counter(), self._tags(text))

    def _tags(self, text: str) -> dict[str, Any]:
        """The ``ref``/``job_id`` of a frame that is not dispatched: parsed when small, else looked for in
        its first and last ``REF_SCAN_BYTES`` (a ``ref`` written anywhere else in a large frame is not
        found: the answer then carries a generated request id)."""
        if len(text) <= self.large:
            with contextlib.suppress(GatewayError):
                frame = parse_json(text)
                if isinstance(frame, dict):
                    return {k: frame[k] for k in ("ref", "job_id") if k in frame}
            return {}
        for part in (text[:REF_SCAN_BYTES], text[-REF_SCAN_BYTES:]):
            found = _REF.search(part)
            if found is not None:
                with contextlib.suppress(orjson.JSONDecodeError):
                    return {"ref": orjson.loads(found.group(1))}
        return {}

    def handle(self, text: str) -> None:
        start = time.perf_counter()
        if len(text) > self.max_frame:
            message = f"frame is larger than {self.max_frame} bytes (TGW_WS_MAX_FRAME_BYTES)"
            too_large = PayloadTooLarge(message, {"limit_bytes": self.max_frame})  # as a body
            self._refuse(too_large, start, self._tags(text))
            return
        if len(text) > self.large:  # parsed off the loop, within the bounds of the model it names
            task = asyncio.create_task(self._parse_large(text, start))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        try:
            frame = parse_json(text)
        except GatewayError as exc:
            self._refuse(exc, start, {})
            return
        self._dispatch(frame, len(text), start)

    async def _parse_large(self, text: str, start: float) -> None:
        data = text.encode()
        info = None
        named = _MODEL_NAME.search(data)
        if named is not None:  # the model's own bounds on the body, and the model it is decoded for
            with contextlib.suppress(GatewayError):
                info = await self.inference.resolve(named.group(1).decode(), None, stream=True)
        try:
            decoded = await self.offload.decode(len(data), decode_frame, data, info)
        except GatewayError as exc:
            self._refuse(exc, start, {})
            return
        self.tasks.discard(asyncio.current_task())  # parsed: not a request yet
        self._dispatch(decoded.frame, len(data), start, decoded, data)

    def _dispatch(
        self, frame: Any, size: int, start: float, decoded: DecodedFrame | None = None, data: bytes = b""
    ) -> None:
        if not isinstance(frame, dict):
            self._refuse(InvalidInput("frame: expected a JSON object with an 'op'"), start, {})
            return
        op, tags = frame.get("op"), {k: frame[k] for k in ("ref", "job_id") if k in frame}
        if op == "ping":
            self.outbox.emit({"type": "pong", **tags})
            return
        if op == "cancel":
            self._cancel(frame, tags)
            return
        if op not in ("infer", "subscribe"):
            message = "op: expected infer, subscribe, cancel or ping"
            self._refuse(InvalidInput(message, {"field": "op"}), start, tags)
            return
        if len(self.tasks) >= self.max_in_flight:
            limit = self.max_in_flight
            message = f"more than {limit} requests in flight on this socket (TGW_WS_MAX_IN_FLIGHT)"
            self._refuse(TooManyInFlight(message, {"limit": self.max_in_flight}), start, tags)
            return
        coro = (
            self._infer(frame, tags, start, size, decoded, data)
            if op == "infer"
            else self._subscribe(frame, tags)
        )
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _infer(
        self, frame: dict[str, Any], tags: dict[str, Any], start: float, size: int = 0,
        decoded: DecodedFrame | None = None, data: bytes = b"",
    ) -> None:  # fmt: skip
        """``decoded``/``data``: a large frame, parsed (and its request decoded) off the loop."""
        # the frame's ``ref`` is the request id when it is a sane one (the rule X-Request-ID follows),
        # else a generated id; the answer echoes ``ref`` as sent either way
        ctx = RequestContext.open("ws", _ref(tags), self.caller)  # this frame's task: logs, Triton
        rid = ctx.request_id
        served = self.requests.begin("frame", "GET", WS_ROUTE, rid, start=start)  # services fill its info
        status = 500
        streaming: Streaming | None = None
        try:
            unknown = set(frame) - _INFER_FIELDS
            if unknown:
                raise InvalidInput(
                    f"{sorted(unknown)[0]}: unknown field in an infer frame", {"field": sorted(unknown)[0]}
                )
            model, version = frame.get("model"), frame.get("version")
            if not isinstance(model, str) or not model or not (version is None or isinstance(version, str)):
                raise InvalidInput(
                    "model: expected a model name (and version, if given, a string)", {"field": "model"}
                )
            info = await self.inference.resolve(model, version, stream=True, ctx=ctx)
            if info.decoupled:  # any number of responses: streamed, cancellable under its ref
                streaming = self._streaming(tags)
            if decoded is None:
                req = validate_v1_body(info, {k: frame[k] for k in _BODY_FIELDS if k in frame})
            else:
                if decoded.decoded_for != (info.name, info.version):  # scanned for another model or version
                    decoded = await self.offload.decode(size, decode_frame, data, info)
                if decoded.error is not None:
                    raise decoded.error
                assert decoded.request is not None
                req = decoded.request
            if streaming is not None:
                status = await self._stream(req, ctx, tags, streaming)
                return
            response = await self.inference.infer(req, ctx)
            values = json_values(response.result.outputs)
            result: Any = response.public()
            if self.offload.encodes_in_child(values):  # written in the pool, placed in the frame as it is
                result = orjson.Fragment(await self.offload.encode(values, result_json, response))
            frame = {"type": "result", **tags, "request_id": rid, "result": result, "cache": response.cache}
            self.outbox.emit(frame)
            status = 200
        except asyncio.CancelledError:
            status = 499  # the socket closed before the answer, or (a stream) a cancel frame came
            if streaming is None or not streaming.cancelled:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()  # this cancellation was the cancel frame's: answered, not propagated
            self.outbox.emit({"type": "cancelled", **tags, "request_id": rid, "responses": streaming.sent})
        except GatewayError as exc:
            self.outbox.emit(error_frame(exc, **tags, request_id=rid))
            status = exc.status_code
        except Exception:
            logger.exception("websocket infer failed")
            self.outbox.emit(error_frame(GatewayError("internal error"), **tags, request_id=rid))
        finally:
            if streaming is not None:
                self._unregister(tags, streaming)
            served.end(status)

    def _streaming(self, tags: dict[str, Any]) -> Streaming:
        """The record of a stream starting under ``tags``'s ``ref`` (a stream without one cannot be
        cancelled but by closing the socket); a ``ref`` already streaming on this socket is refused."""
        streaming = Streaming(asyncio.current_task())
        if "ref" in tags:
            key = _ref_key(tags["ref"])
            if key in self.streams:
                raise InvalidInput(
                    "ref: a stream with this ref is in flight on this socket", {"field": "ref"}
                )
            self.streams[key] = streaming
        return streaming

    def _unregister(self, tags: dict[str, Any], streaming: Streaming) -> None:
        if "ref" in tags:
            key = _ref_key(tags["ref"])
            if self.streams.get(key) is streaming:
                del self.streams[key]

    async def _stream(
        self, req: InferRequest, ctx: RequestContext, tags: dict[str, Any], streaming: Streaming
    ) -> int:
        """Every response of a decoupled model's request, one ``stream`` frame each (``seq`` from 1,
        ``final`` on the last: Triton's final response, which may have no outputs). Each frame waits for
        room below ``stream_share`` in the outbox and yields to the loop first, so streams take turns with
        each other and never crowd out the frames that cannot wait; while a client does not read, the
        stream's own bounded buffer fills, and past it the request is cancelled in Triton
        (``stream_overflow``, the error frame once there is room). Raises what the stream raised."""
        rid = ctx.request_id
        stream = streaming.stream = await self.inference.open_stream(req, ctx)
        try:
            async for response in stream:
                if streaming.sent:  # one frame per turn: other requests' frames and streams interleave
                    await asyncio.sleep(0)  # (not before the first: its latency is the stream's)
                await self.outbox.room(self.stream_share)
                result: Any = response.public()
                values = json_values(response.result.outputs)
                if self.offload.encodes_in_child(values):
                    result = orjson.Fragment(await self.offload.encode(values, result_json, response))
                final = response.result.final
                streaming.sent += 1
                self.outbox.emit({
                    "type": "stream", **tags, "request_id": rid, "seq": streaming.sent, "final": final,
                    "result": result, "cache": stream.cache,
                })  # fmt: skip
                if final:
                    self._unregister(tags, streaming)  # answered: a later cancel finds nothing
                    return 200
            raise UpstreamError(
                "the stream ended before Triton's final response", {"responses": streaming.sent}
            )
        finally:
            await stream.aclose()

    def _cancel(self, frame: dict[str, Any], tags: dict[str, Any]) -> None:
        """``{"op":"cancel","ref":…}``: the stream in flight under ``ref`` is cancelled (in Triton too) and
        ends with ``{"type":"cancelled","ref","request_id","responses"}``. Not a request (like ``ping``):
        not counted against the in-flight bound nor recorded; one that finds no stream gets an error."""
        if "ref" not in frame:
            self.outbox.emit(error_frame(InvalidInput("ref: expected the ref of a stream", {"field": "ref"})))
            return
        streaming = self.streams.get(_ref_key(frame["ref"]))
        if streaming is None:
            message = "ref: no stream in flight on this socket with this ref"
            self.outbox.emit(error_frame(NotFound(message, {"field": "ref"}), **tags))
            return
        if streaming.cancelled:
            return  # cancelled already: its cancelled frame is on its way
        streaming.cancelled = True
        if streaming.stream is not None:
            streaming.stream.cancel("client")  # Triton's request is cancelled now
        if streaming.task is not None:
            streaming.task.cancel()  # the frame's task answers with the cancelled frame

    async def _subscribe(self, frame: dict[str, Any], tags: dict[str, Any]) -> None:
        job_id = frame.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            self.outbox.emit(
                error_frame(InvalidInput("job_id: expected a job id", {"field": "job_id"}), **tags)
            )
            return
        try:
            await self.service.watch(self.owner, job_id, self.outbox.emit)
        except Exception:  # never leave a subscription unanswered
            logger.exception("job subscription failed")
            self.outbox.emit(error_frame(GatewayError("internal error"), **tags))
