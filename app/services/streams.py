"""A streamed request as every door consumes it: ``ResponseStream``.

``InferenceService.open_stream(request, ctx)`` answers a request for a decoupled model (any number of
responses) with one ``ResponseStream``, the same for SSE, ``/v1/ws``, gRPC ``ModelStreamInfer`` and jobs:

* **Cache.** Its ``cache`` outcome is known before the first response (a door sends ``X-Cache`` first): a
  ``HIT`` replays a completed stream stored earlier, response for response; a ``MISS`` is read from
  Triton and, once complete (Triton's final response came, nothing failed or was cancelled) and at most
  ``StreamLimits.cache_max_bytes``, stored for the next identical request (same model version, inputs,
  parameters, cache scope).
* **Bounded buffering.** A pump task reads Triton's responses into a queue the door reads from. A consumer
  slower than Triton lets it grow to ``buffer_responses`` responses or ``buffer_bytes`` bytes; past that the
  stream is cancelled in Triton and ends with a ``stream_overflow`` error after what was buffered: a client
  that stops reading never makes the gateway hold more than the bound.
* **Cancellation that reaches Triton.** ``cancel(by)`` (the door's client went away, a job was deleted),
  ``ctx.cancelled`` set, the caller's deadline or the tier's longest stream (``max_stream_s``) passing:
  each cancels the pump, which cancels the gRPC stream to Triton, which Triton passes to the model (a
  decoupled model that checks ``request.is_cancelled()`` stops and frees its instance).
* **Metrics**, once for every door: streams open, time to the first response, responses per stream and how
  each ended (``tgw_streams_total{door,end}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal

from app.clients.protocols import TritonResult
from app.domain import CacheOutcome, InferResponse
from app.errors import GatewayError, ServiceUnavailable, UpstreamTimeout
from app.observability import metrics
from app.observability.context import note_answer, note_response
from app.request_context import RequestContext

logger = logging.getLogger(__name__)

StreamEnd = Literal["completed", "replayed", "client", "deadline", "duration", "overflow", "job", "error"]
Canceller = Literal["client", "job"]


class StreamOverflow(ServiceUnavailable, code="stream_overflow"):
    """The stream's consumer read slower than Triton answered, past the buffer bound: cancelled."""


@dataclass(frozen=True, slots=True)
class StreamLimits:
    buffer_responses: int = 256
    buffer_bytes: int = 8 * 1024 * 1024
    max_duration_s: float = 600.0  # a tier without its own max_stream_s
    cache_max_bytes: int = 1024 * 1024  # 0: never cached


_END = object()


def _size(result: TritonResult) -> int:
    size = 64
    for arr in result.outputs.values():
        size += arr.nbytes
    return size


class ResponseStream:
    """Every response of one streamed request, in order, the last with ``result.final`` set; ``async for``
    it, then ``aclose()`` (a door that leaves early cancels the request in Triton). Errors (Triton's, the
    deadline, an overflow) are raised by the iteration after the responses that came before them."""

    def __init__(
        self, model: str, ctx: RequestContext, limits: StreamLimits, cache: CacheOutcome,
        source: AsyncIterator[TritonResult] | None, replay: list[TritonResult] | None = None,
        store: Callable[[list[TritonResult]], Awaitable[None]] | None = None, max_duration_s: float = 0.0,
    ) -> None:  # fmt: skip
        self.model = model
        self.ctx = ctx
        self.door = ctx.door
        self.cache: CacheOutcome = cache
        self.limits = limits
        self.request_id = ctx.request_id
        self.started = time.perf_counter()
        self.responses = 0
        self.end: StreamEnd | None = None
        self._queue: asyncio.Queue[TritonResult | object] = asyncio.Queue()
        self._held_bytes = 0
        self._error: GatewayError | None = None
        self._store = store
        self._max_duration_s = max_duration_s
        self._complete = replay is not None  # Triton's final response came: nothing left to cancel
        self._tasks: list[asyncio.Task[None]] = []
        metrics.STREAMS_OPEN.labels(self.door).inc()
        self._open = True
        if replay is not None:
            for result in replay:
                self._queue.put_nowait(result)
            self._queue.put_nowait(_END)
        else:
            assert source is not None
            self._tasks.append(asyncio.create_task(self._pump(source)))
            if ctx.cancelled is not None:
                self._tasks.append(asyncio.create_task(self._watch(ctx.cancelled)))

    # --- the consumer's side -------------------------------------------------------------------------
    def __aiter__(self) -> ResponseStream:
        return self

    async def __anext__(self) -> InferResponse:
        if self.end is not None and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._finish(self._ended_by())
            if self._error is not None:
                error, self._error = self._error, None
                raise error
            raise StopAsyncIteration
        assert isinstance(item, TritonResult)
        self._held_bytes -= _size(item)
        if self.responses == 0:
            metrics.STREAM_FIRST_RESPONSE.labels(self.door, self.cache).observe(
                time.perf_counter() - self.started
            )
        self.responses += 1
        note_answer(_size(item) - 64, saved_s=item.compute_s if self.cache == "HIT" else 0.0)
        note_response()
        return InferResponse(self.model, item, self.cache)

    def cancel(self, by: Canceller = "client") -> None:
        """The door's consumer is gone (``client``) or its job was deleted (``job``): the request is
        cancelled in Triton now; nothing more is stored or delivered."""
        if self.end is None and not self._complete:
            self._stop()
            self._finish(by)
            self._queue.put_nowait(_END)  # a reader still waiting wakes (the pump may never have run)

    async def aclose(self) -> None:
        """Done with the stream: if Triton has not sent its final response, the request is cancelled
        (``client``); waits for the pump (which ends the upstream call cleanly after the final response)."""
        self.cancel("client")
        for task in self._tasks[1:]:  # the watcher of ctx.cancelled, if any
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._finish(self._ended_by())  # a consumer that stopped at the final response

    async def __aenter__(self) -> ResponseStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- the producer's side -------------------------------------------------------------------------
    async def _pump(self, source: AsyncIterator[TritonResult]) -> None:
        collected: list[TritonResult] | None = [] if self._store is not None else None
        collected_bytes = 0
        completed = False
        limits = self.limits
        pumped = time.perf_counter()
        try:
            async with asyncio.timeout(self._max_duration_s or None):
                async for result in source:
                    size = _size(result)
                    if self._queue.qsize() >= limits.buffer_responses or (
                        self._held_bytes + size > limits.buffer_bytes
                    ):
                        self._error = StreamOverflow(
                            "the stream's consumer read slower than the model answered; the request was "
                            "cancelled in Triton",
                            {
                                "buffer_responses": limits.buffer_responses,
                                "buffer_bytes": limits.buffer_bytes,
                            },
                        )
                        self.end = "overflow"
                        return  # leaving the loop closes the upstream stream: Triton cancels the request
                    if collected is not None:
                        collected_bytes += size
                        if collected_bytes <= limits.cache_max_bytes:
                            collected.append(result)
                        else:
                            collected = None
                    if result.final:  # the source ends right after it (the upstream call closes cleanly)
                        completed = self._complete = True
                        result = replace(result, compute_s=time.perf_counter() - pumped)  # stored with it
                        if collected is not None:  # stored before the final response is handed on: the
                            await self._store_safely(collected)  # client's next request finds it
                    self._held_bytes += size
                    self._queue.put_nowait(result)
                    if completed:
                        self._queue.put_nowait(_END)
                    else:  # the consumer's turn now: without it, responses Triton has already sent are read
                        await asyncio.sleep(0)  # first, holding this one back (~1 ms at c=1, measured)
        except TimeoutError:
            self.end = "duration"
            self._error = UpstreamTimeout(
                "the stream lasted longer than its tier allows; the request was cancelled in Triton",
                {"max_stream_s": self._max_duration_s},
            )
        except GatewayError as exc:
            self._error = exc
            self.end = "deadline" if isinstance(exc, UpstreamTimeout) else "error"
        finally:
            note_answer(0, time.perf_counter() - pumped)  # usage: the stream's Triton time
            if not completed:
                self._queue.put_nowait(_END)
            with contextlib.suppress(BaseException):
                await source.aclose()  # type: ignore[attr-defined]

    async def _store_safely(self, results: list[TritonResult]) -> None:
        assert self._store is not None
        try:
            await self._store(results)
        except Exception:  # never fails the stream
            logger.warning("a completed stream could not be stored in the cache", exc_info=True)

    async def _watch(self, cancelled: asyncio.Event) -> None:
        await cancelled.wait()
        self.cancel("client")

    def _stop(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()

    def _ended_by(self) -> StreamEnd:
        if self.end is not None:
            return self.end
        return "replayed" if self.cache == "HIT" else "completed"

    def _finish(self, end: StreamEnd) -> None:
        if not self._open:
            return
        self._open = False
        self.end = self.end or end
        if end in ("client", "job"):
            self.end = end
        metrics.STREAMS_OPEN.labels(self.door).dec()
        metrics.STREAMS.labels(self.door, self.end).inc()
        metrics.STREAM_RESPONSES.labels(self.door).observe(self.responses)
        if self.end not in ("completed", "replayed"):
            logger.info("stream %s of %s ended: %s after %d responses", self.request_id, self.model,
                        self.end, self.responses)  # fmt: skip
            self._stop()
        # completed: the pump goes on to close the upstream call cleanly (aclose waits)
