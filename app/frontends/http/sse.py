"""Server-sent events for the raw routes: ``SSEReply``, what a streaming handler returns instead of a
``Reply`` (``/v1/models/{model}/stream``, ``/v2/models/{model}/generate_stream``).

The request pipeline (``app.frontends.http.pipeline``) serves it as it serves every raw route (request id,
admission, access line, metrics) and writes it with sse-starlette's ``EventSourceResponse``, so:

* **the key's in-flight slot is held for the stream's whole life**: the pipeline releases its grant only
  once the reply was written to its end (or the client went away), not when the handler returned;
* **a client that goes away cancels the request in Triton at once**: sse-starlette watches
  ``http.disconnect``; its close handler calls ``ResponseStream.cancel("client")`` (the gRPC call to Triton
  is cancelled, Triton passes it to the model), and the pipeline ``aclose()``-s the stream in any case;
* **the status is the first response's**: the response head is held back until the first event is
  written, so a stream whose first item is an error answers that error's status (400, 404, 504...) with
  the error event as its body, as Triton's own ``generate_stream`` does; later errors are events of a
  ``200`` stream;
* **a consumer that stops reading holds the gateway to a bound**: a blocked socket blocks the writer,
  the ``ResponseStream`` buffers up to ``TGW_STREAM_BUFFER_RESPONSES`` responses, then cancels the request
  in Triton (``stream_overflow``).

The door's codec renders each response (``render``: None skips it, e.g. Triton's empty final response
on ``generate_stream``) and the error (``render_error``) as a ``ServerSentEvent``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import AppStatus
from starlette.types import Message, Receive, Scope, Send

from app.domain import InferResponse
from app.errors import GatewayError, is_kserve_path, kserve_status, log_gateway_error, log_unhandled
from app.services.streams import ResponseStream

logger = logging.getLogger(__name__)

SEP = "\n"  # events end with "\n\n", as Triton's generate_stream writes them
PING_S = 15.0  # a comment line while nothing else is sent, for proxies that close idle connections

# sse-starlette ends every stream, as a clean end of body, the moment the server starts to exit: a client
# would take a stream cut short for a complete one. The gateway drains streams as it drains every request
# (app.server.graceful: up to TGW_DRAIN_S once the listener closed; past it uvicorn cancels the request, the
# stream is cancelled in Triton and the connection is cut, an incomplete body the client sees as one).
AppStatus.disable_automatic_graceful_drain()

Render = Callable[[InferResponse, int], ServerSentEvent | None]
RenderError = Callable[[GatewayError], ServerSentEvent]


def event(data: str, name: str | None = None) -> ServerSentEvent:
    """One event (``event: name`` when given, ``data: ...``), separated as Triton separates them."""
    return ServerSentEvent(data, event=name, sep=SEP)


class SSEReply:
    """A streamed answer: ``responses`` (a ``ResponseStream``, or a one-response iterator for a model that
    answers once) rendered as server-sent events. ``status`` and ``cache`` are final once the first event
    was rendered (the pipeline sends the head then)."""

    __slots__ = ("cache", "disconnected", "render", "render_error", "responses", "status", "stream")

    def __init__(
        self, responses: AsyncIterator[InferResponse], render: Render, render_error: RenderError, *,
        stream: ResponseStream | None = None,
    ) -> None:  # fmt: skip
        self.responses = responses
        self.stream = stream
        self.render = render
        self.render_error = render_error
        self.status = 200
        self.disconnected = False  # the client went away before the stream ended
        self.cache: str | None = stream.cache if stream is not None else None

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        sent = 0
        try:
            async for response in self.responses:
                self.cache = response.cache
                event = self.render(response, sent + 1)  # seq counts from 1, as on /v1/ws and a job's
                if event is not None:
                    sent += 1
                    yield event
        except GatewayError as exc:
            log_gateway_error(exc)
            if sent == 0:
                self.status = exc.status_code
            yield self.render_error(exc)

    def cancel(self) -> None:
        if self.stream is not None:
            self.stream.cancel("client")

    async def aclose(self) -> None:
        """The reply is over (written, or its client gone): the stream is closed (a stream that had not
        ended is cancelled in Triton)."""
        closer: Any = getattr(self.responses, "aclose", None)
        try:
            if closer is not None:
                with contextlib.suppress(RuntimeError):  # a generator never started or already closed
                    await closer()
        finally:
            if self.stream is not None:
                await self.stream.aclose()

    async def send(
        self, scope: Scope, receive: Receive, send: Send, head: list[tuple[bytes, bytes]]
    ) -> tuple[int, int]:
        """Write the reply (``head``: headers the pipeline adds) until it ends or its client goes away;
        returns (status, body bytes sent)."""
        pending: Message | None = None
        sent = 0
        kserve = is_kserve_path(scope["path"])

        async def deferred(message: Message) -> None:
            nonlocal pending, sent
            if message["type"] == "http.response.start":
                pending = message  # held until the first event: its status is the first item's
                return
            if pending is not None:
                start, pending = pending, None
                headers = [*start.get("headers", ()), *head]
                if self.cache is not None:
                    headers.append((b"x-cache", self.cache.encode()))
                status = kserve_status(self.status) if kserve else self.status
                self.status = status
                await send({**start, "status": status, "headers": headers})
            sent += len(message.get("body", b""))
            await send(message)

        async def client_closed(_: Message) -> None:
            self.disconnected = True
            self.cancel()  # at once: the model stops between two steps

        response = EventSourceResponse(
            self._guarded(), sep=SEP, ping=PING_S, client_close_handler_callable=client_closed
        )
        await response(scope, receive, deferred)
        return (499 if self.disconnected else self.status), sent

    async def _guarded(self) -> AsyncIterator[ServerSentEvent]:
        """``events`` with an unexpected exception logged and rendered as an error event (the head may
        already be sent: the pipeline cannot answer 500 any more)."""
        try:
            async for event in self.events():
                yield event
        except Exception as exc:
            code, _, message = log_unhandled(exc)
            if self.status == 200:
                self.status = code
            yield self.render_error(GatewayError(message))


async def one_response(answer: Callable[[], Any]) -> AsyncIterator[InferResponse]:
    """The one answer of a model that answers once (``answer``: the unary call), as a stream's iterator: a
    streaming route serves every model, its error coming as the stream's error event."""
    response: InferResponse = await answer()
    yield response
