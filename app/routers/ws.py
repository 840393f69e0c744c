"""WebSockets: ``/v1/jobs/{id}/ws`` (one job's events, then its result, then close 1000) and ``/v1/ws``
(one socket, many requests: ``infer`` and ``subscribe`` frames, answers tagged with ``ref``/``job_id``).

Each socket has its own bounded outbox drained by its own sender task; producers only ``put_nowait``, so
a slow client cannot hold up anyone else. A client that falls ``TGW_WS_SEND_QUEUE`` frames behind is
closed with 1008. Heartbeat frames ``{"type": "heartbeat"}`` go out every ``TGW_WS_HEARTBEAT_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket

from app.codecs import v1
from app.deps import ConnInferenceDep, ConnSettingsDep, JobEventsDep, JobsDep
from app.errors import GatewayError, InvalidInput
from app.observability import metrics
from app.services.inference import InferenceService
from app.services.jobs.events import EventHub
from app.services.jobs.service import JobService
from app.services.jobs.store import TERMINAL
from app.services.payload import parse_json

router = APIRouter(tags=["jobs"])
logger = logging.getLogger(__name__)

POLL_S = 2.0  # pub/sub wakes watchers at once; this re-read of the store is the safety net
_INFER_FIELDS = {"op", "ref", "model", "version", "inputs", "outputs", "parameters"}


class TooManyInFlight(GatewayError):
    status_code = 429
    code = "too_many_in_flight"


class Outbox:
    def __init__(self, ws: WebSocket, maxsize: int) -> None:
        self.ws = ws
        self.queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize)
        self.overflowed = False
        self.task = asyncio.create_task(self._run())

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


async def watch_job(service: JobService, hub: EventHub, job_id: str, emit: Any) -> bool:
    """Emit status changes then the final job; False when the job does not exist."""
    wake = asyncio.Event()
    unsubscribe = hub.subscribe(job_id, lambda _j, _s: wake.set())
    try:
        last = None
        while True:
            wake.clear()
            raw = await service.store.get(job_id)
            if raw is None:
                missing = {"code": "not_found", "message": f"no job {job_id!r}", "details": {}}
                emit({"type": "error", "job_id": job_id, "error": missing})
                return False
            status = raw.get("status")
            if status != last:
                emit({"type": "status", "job_id": job_id, "status": status})
                last = status
            if status in TERMINAL:
                emit({"type": "result", "job_id": job_id, "job": await service.view(raw)})
                return True
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await wake.wait()
    finally:
        unsubscribe()


async def _heartbeat(outbox: Outbox, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        outbox.emit({"type": "heartbeat"})


def _count_socket(service: JobService, delta: int) -> None:
    """Open sockets: this replica's count (``/v1/jobs/stats``) and the ``tgw_websockets_open`` gauge."""
    service.websockets_open += delta
    (metrics.websocket_opened if delta > 0 else metrics.websocket_closed)()


async def _until_disconnect(ws: WebSocket) -> None:
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass


@router.websocket("/v1/jobs/{job_id}/ws")
async def job_socket(
    ws: WebSocket, job_id: str, service: JobsDep, hub: JobEventsDep, settings: ConnSettingsDep
) -> None:
    await ws.accept()
    _count_socket(service, +1)
    outbox = Outbox(ws, settings.ws_send_queue)
    watcher = asyncio.create_task(watch_job(service, hub, job_id, outbox.emit))
    others = [
        asyncio.create_task(_until_disconnect(ws)),
        asyncio.create_task(_heartbeat(outbox, settings.ws_heartbeat_s)),
    ]
    try:
        await asyncio.wait([watcher, outbox.task, others[0]], return_when=asyncio.FIRST_COMPLETED)
        if watcher.done() and not watcher.cancelled() and watcher.exception() is None:
            await outbox.flush_and_stop()
            with contextlib.suppress(Exception):
                await ws.close(1000 if watcher.result() else 4404)
        elif outbox.overflowed:
            with contextlib.suppress(Exception):
                await ws.close(1008, "client too slow")
    finally:
        _count_socket(service, -1)
        for task in (watcher, outbox.task, *others):
            task.cancel()


class Multiplexer:
    """State of one ``/v1/ws`` socket."""

    def __init__(self, ws: WebSocket, service: JobService, hub: EventHub, inference: InferenceService,
                 max_in_flight: int, max_frame: int, outbox: Outbox) -> None:  # fmt: skip
        self.ws, self.service, self.hub, self.inference = ws, service, hub, inference
        self.max_in_flight, self.max_frame, self.outbox = max_in_flight, max_frame, outbox
        self.tasks: set[asyncio.Task[None]] = set()

    def handle(self, text: str) -> None:
        emit = self.outbox.emit
        if len(text) > self.max_frame:
            message = f"frame is larger than {self.max_frame} bytes (TGW_WS_MAX_FRAME_BYTES)"
            emit(error_frame(InvalidInput(message, {"limit_bytes": self.max_frame})))
            return
        try:
            frame = parse_json(text)
        except GatewayError as exc:
            emit(error_frame(exc))
            return
        if not isinstance(frame, dict):
            emit(error_frame(InvalidInput("frame: expected a JSON object with an 'op'")))
            return
        op, tags = frame.get("op"), {k: frame[k] for k in ("ref", "job_id") if k in frame}
        if op == "ping":
            emit({"type": "pong", **tags})
            return
        if op not in ("infer", "subscribe"):
            emit(error_frame(InvalidInput("op: expected infer, subscribe or ping", {"field": "op"}), **tags))
            return
        if len(self.tasks) >= self.max_in_flight:
            emit(
                error_frame(
                    TooManyInFlight(
                        f"more than {self.max_in_flight} requests in flight on this socket "
                        "(TGW_WS_MAX_IN_FLIGHT)",
                        {"limit": self.max_in_flight},
                    ),
                    **tags,
                )
            )
            return
        coro = self._infer(frame, tags) if op == "infer" else self._subscribe(frame, tags)
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _infer(self, frame: dict[str, Any], tags: dict[str, Any]) -> None:
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
            body = {k: frame[k] for k in ("inputs", "outputs", "parameters") if k in frame}
            req = v1.decode_body(await self.inference.resolve(model, version), body)
            req.request_id = str(tags.get("ref", ""))
            response = await self.inference.infer(req)
            frame = {"type": "result", **tags, "result": v1.result(response), "cache": response.cache}
            self.outbox.emit(frame)
        except GatewayError as exc:
            self.outbox.emit(error_frame(exc, **tags))
        except Exception:
            logger.exception("websocket infer failed")
            self.outbox.emit(error_frame(GatewayError("internal error"), **tags))

    async def _subscribe(self, frame: dict[str, Any], tags: dict[str, Any]) -> None:
        job_id = frame.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            self.outbox.emit(
                error_frame(InvalidInput("job_id: expected a job id", {"field": "job_id"}), **tags)
            )
            return
        await watch_job(self.service, self.hub, job_id, self.outbox.emit)


@router.websocket("/v1/ws")
async def multiplexed_socket(
    ws: WebSocket, service: JobsDep, hub: JobEventsDep, inference: ConnInferenceDep, settings: ConnSettingsDep
) -> None:
    await ws.accept()
    _count_socket(service, +1)
    outbox = Outbox(ws, settings.ws_send_queue)
    mux = Multiplexer(
        ws, service, hub, inference, settings.ws_max_in_flight, settings.ws_max_frame_bytes, outbox
    )
    beat = asyncio.create_task(_heartbeat(outbox, settings.ws_heartbeat_s))
    try:
        while not outbox.overflowed:
            receive = asyncio.create_task(ws.receive())
            await asyncio.wait([receive, outbox.task], return_when=asyncio.FIRST_COMPLETED)
            if not receive.done():
                receive.cancel()
                break
            msg = receive.result()
            if msg["type"] == "websocket.disconnect":
                break
            text = msg.get("text")
            if text is None:
                text = (msg.get("bytes") or b"").decode("utf-8", "replace")
            mux.handle(text)
        if outbox.overflowed:
            with contextlib.suppress(Exception):
                await ws.close(1008, "client too slow")
    finally:
        _count_socket(service, -1)
        for task in (beat, outbox.task, *mux.tasks):
            task.cancel()
