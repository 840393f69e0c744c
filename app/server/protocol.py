"""The HTTP server layer: one client must not make the gateway unreachable.

uvicorn (0.54) bounds the keep-alive idle time (``timeout_keep_alive``) but nothing else a client controls:
a connection that never sends a byte, a request head sent one byte a minute, or a chunked body that never
ends each hold a socket forever, and ``limit_concurrency`` answers 503 only once a request head has been
read (idle sockets still pile up until ``accept()`` fails with EMFILE). ``GuardedHttpToolsProtocol`` is
uvicorn's httptools protocol with what is missing, at the cost of one timer per request:

- **head timeout** (``TGW_HEADER_TIMEOUT_S``): from the connection's start, and from the first byte of each
  later request, until the end of the request head. Expired: closed (with a 408 if a byte had arrived).
- **head size** (``TGW_MAX_HEADER_BYTES``): a longer request head is answered 431 and closed (httptools
  itself has no limit).
- **body timeout** (``TGW_BODY_TIMEOUT_S``): from the end of the head until the end of the body, in total,
  so a body dripped a byte at a time is cut as surely as one that never ends: 408, connection closed, and
  the application's ``receive()`` sees ``http.disconnect``.
- **connection cap** (``TGW_MAX_CONNECTIONS``; default: the file-descriptor limit less a reserve): at the
  cap a new connection first evicts the connection idle longest (no request in progress), so idle sockets
  cannot lock out a real client; with no idle one to evict it is refused cheaply (a canned 503, closed,
  nothing parsed, nothing logged per connection).
- the idle keep-alive timeout is uvicorn's own (``TGW_KEEPALIVE_TIMEOUT_S``).
- **slow readers**: a client that does not read its answer gets it at most ``TGW_SEND_BUFFER_BYTES``
  ahead (per connection; the rest waits in the application, and the request with its key's in-flight
  slot lasts until the answer has drained); an answer not drained within ``TGW_SEND_TIMEOUT_S`` of the
  client falling behind drops the connection with its buffer; and past ``TGW_SEND_BUFFER_TOTAL_BYTES``
  held for such clients per process, the connection stalled longest is dropped.
- **early answers**: a ``413`` sent before the request body has arrived is followed by reading and
  discarding the rest of the body (up to ``TGW_BODY_DISCARD_BYTES``, within the body deadline), then the
  close; closing with unread bytes would reset the connection under a client still sending.
- **graceful shutdown**: once the listener is closed, a connection idle between requests is closed, but
  one accepted whose request has not (fully) arrived yet may still send it, within the head deadline;
  uvicorn would close it and reset a client that has already sent its request.

``server_config(app, settings, **extra)`` builds the ``uvicorn.Config`` with all of it (and uvloop when
installed); ``tgw up``, ``tgw serve`` and the tests' in-process gateway use it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import resource
from asyncio import TimerHandle
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.settings import ServerSettings

logger = logging.getLogger(__name__)

FD_RESERVE_MIN = 256  # descriptors kept for Triton/Redis pools, files and the listener


@dataclass(frozen=True, slots=True)
class ServerLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    max_connections: int
    send_timeout_s: float = 30.0
    send_buffer_bytes: int = 1024 * 1024
    send_buffer_total_bytes: int = 256 * 1024 * 1024
    body_discard_bytes: int = 64 * 1024 * 1024


def _canned(status: bytes, message: str) -> bytes:
    code = status.split(b" ", 1)[1].decode().lower().replace(" ", "_")
    body = orjson.dumps({"error": {"code": code, "message": message, "details": {}}})
    return b"".join([
        b"HTTP/1.1 ", status, b"\r\ncontent-type: application/json\r\nconnection: close\r\n",
        b"content-length: ", str(len(body)).encode(), b"\r\n\r\n", body,
    ])  # fmt: skip


_HEAD_TOO_LARGE = _canned(b"431 Request Header Fields Too Large", "request head exceeds TGW_MAX_HEADER_BYTES")


async def _head_too_large(scope: Any, receive: Any, send: Any) -> None:
    """The ASGI app a connection runs instead of the gateway when its complete request head was too long."""
    body = _HEAD_TOO_LARGE.split(b"\r\n\r\n", 1)[1]
    await send({"type": "http.response.start", "status": 431, "headers": [
        (b"content-type", b"application/json"), (b"connection", b"close"),
        (b"content-length", str(len(body)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
)


def nofile_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (what a server is allowed; Python starts at the soft one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # pragma: no cover - some sandboxes refuse
            return soft
        return hard
    return soft


def connection_cap(configured: int, fd_limit: int | None = None) -> int:
    """``configured`` when set (> 0), else the descriptor limit less a reserve (10 %, at least 256)."""
    if configured > 0:
        return configured
    fd_limit = nofile_limit() if fd_limit is None else fd_limit
    return max(16, fd_limit - max(FD_RESERVE_MIN, fd_limit // 10))


def _sized(start: Any) -> bool:
    """Whether an ``http.response.start`` is followed at once by its body: an answer that announces its
    length, or server-sent events (``app.frontends.http.sse`` starts those only with their first event in
    hand). Another stream's head is written as soon as it starts: its first part may be long in coming."""
    for name, value in start.get("headers", ()):
        name = name.lower()
        if name == b"content-length" or (name == b"content-type" and value.startswith(b"text/event-stream")):
            return True
    return False


class _HeadHold:
    """The transport as one ``send`` of uvicorn's sees it: holds the response head it writes
    (``head`` None) or writes what was held together with the first thing written after it, one vectored
    write; everything else goes to the real transport."""

    __slots__ = ("head", "holding", "real")

    def __init__(self, real: Any, head: bytes | None = None) -> None:
        self.real, self.head, self.holding = real, head, head is None

    def write(self, data: bytes | memoryview) -> None:
        if self.holding:  # http.response.start: the head
            self.head, self.holding = bytes(data), False
        elif self.head is not None:  # the first body write: with the head
            head, self.head = self.head, None
            self.real.writelines((head, data))
        else:
            self.real.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus head/body deadlines, a head-size cap and a connection cap
    (module docstring). The limits come from ``config.tgw_limits`` (set by ``server_config``)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        limits: ServerLimits | None = getattr(config, "tgw_limits", None)
        self.limits = limits or ServerLimits(10.0, 30.0, 65536, connection_cap(0))
        self._deadline: TimerHandle | None = None
        self._in_head = True
        self._head_bytes = 0
        self._chunk = 0
        self._got_bytes = False  # of the current request head
        self._shutting_down = False  # the server is draining: the request on its way is the last one
        self._send_deadline: TimerHandle | None = None  # the answer must drain by then (a slow reader)
        self._held = 0  # bytes of the answer being sent (held until it has drained)
        self._linger = False  # answered early (413): reading and discarding the rest of the body
        self._linger_wanted = False  # ... once that early answer has been written
        self._discarded = 0
        state = self.server_state
        idle = getattr(state, "tgw_idle", None)
        if idle is None:
            idle = {}
            state.tgw_idle = idle  # type: ignore[attr-defined]
        self._idle: dict[GuardedHttpToolsProtocol, None] = idle  # oldest first
        stalled = getattr(state, "tgw_stalled", None)
        if stalled is None:
            stalled = {}
            state.tgw_stalled = stalled  # type: ignore[attr-defined]
        self._stalled: dict[GuardedHttpToolsProtocol, None] = stalled  # behind in reading, oldest first

    # --- connection -----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections and not self._evict_idle():
            transport.write(_REFUSED)
            transport.close()
            self.transport = transport
            return
        super().connection_made(transport)
        self._idle[self] = None
        self._arm(self.limits.header_timeout_s, self._head_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._idle.pop(self, None)
        self._stalled.pop(self, None)
        self._held = 0
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None
        if self.parser is None or self.flow is None:  # refused at the cap: uvicorn never saw it
            return
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """Called by the server once its listener is closed. uvicorn's own closes every connection with no
        request in progress, including one accepted a moment ago whose request is still on its way (not
        read yet, or its head read in part): that client, which already sent its request, gets a reset.
        Here only a connection idle between requests closes now; one whose request is on its way may still
        send it (bounded by the head deadline, armed since the connection or the request began), and every
        request from now on is the connection's last."""
        if self.parser is None or self.flow is None or self._shutting_down:  # refused at the cap
            return
        self._shutting_down = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False  # in progress: closed after its response (as uvicorn)
        elif cycle is not None and not self._in_head and not self.transport.is_closing():
            self.transport.close()  # idle after a response: nothing is on its way
        # else: accepted and no request head complete yet (cycle None, or the next head begun): let it come

    def _evict_idle(self) -> bool:
        while self._idle:
            victim = next(iter(self._idle))
            del self._idle[victim]
            if not victim.transport.is_closing():
                victim.transport.close()
                return True
        return False

    # --- slow readers -----------------------------------------------------------------------------
    def pause_writing(self) -> None:
        """The write buffer passed its high-water mark: the client is behind in reading. Its answer must
        drain within TGW_SEND_TIMEOUT_S, and what it holds counts toward the per-process bound."""
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(self.limits.send_timeout_s, self._send_expired)
        self._stalled[self] = None
        self._enforce_total()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stalled.pop(self, None)
        if self._held == 0 and self._send_deadline is not None:  # no answer left half-sent
            self._send_deadline.cancel()
            self._send_deadline = None

    def _holding(self) -> int:
        return max(self._held, self.transport.get_write_buffer_size())

    def _enforce_total(self) -> None:
        """Past TGW_SEND_BUFFER_TOTAL_BYTES held for stalled clients, drop the one stalled longest."""
        bound = self.limits.send_buffer_total_bytes
        total = sum(conn._holding() for conn in self._stalled)
        while total > bound and self._stalled:
            victim = next(iter(self._stalled))
            del self._stalled[victim]
            total -= victim._holding()
            logger.info("dropping a connection behind in reading: answers held for slow readers passed "
                        "TGW_SEND_BUFFER_TOTAL_BYTES (%d)", bound)  # fmt: skip
            victim.transport.abort()

    def _send_expired(self) -> None:
        self._send_deadline = None
        logger.info("dropping a connection whose answer was not read within TGW_SEND_TIMEOUT_S (%g s)",
                    self.limits.send_timeout_s)  # fmt: skip
        self.transport.abort()  # close() would wait for the buffer to drain, forever for a non-reader

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        cycle.send = self._guarded_send(cycle, cycle.send)
        super()._start_asgi_task(cycle, app)

    def _guarded_send(self, cycle: Any, send: Any) -> Any:
        """The cycle's ``send`` with (1) a large body written at most TGW_SEND_BUFFER_BYTES ahead of the
        reader (uvicorn waits for the buffer to drain before each write), (2) the final write waiting
        until the answer has drained, so the request (and the key's in-flight slot) lasts until the
        client has read it, bounded by the send deadline, and (3) an early answer with ``Connection:
        close`` (413) before the request body has arrived followed by reading and discarding the rest
        of the body (TGW_BODY_DISCARD_BYTES), so the client reads the answer instead of a reset, and
        (4) the head of an answer of known length (or of server-sent events) written together with its
        body (its first event): one system call instead of two, and one wake-up of the client (uvicorn
        writes the head on ``http.response.start``; measured: a ``write`` is ~5 % of a cache miss's CPU on
        loopback)."""
        step = self.limits.send_buffer_bytes
        head: bytes | None = None  # the response head uvicorn wrote, held for the first body write

        async def guarded(message: Any) -> None:
            nonlocal head
            kind = message["type"]
            if kind == "http.response.start" and not cycle.response_started and _sized(message):
                real = cycle.transport
                held = cycle.transport = _HeadHold(real)
                try:
                    await send(message)
                finally:
                    cycle.transport = real
                head = held.head
                return
            if head is not None and kind == "http.response.body":
                head, pending = None, head
                real = cycle.transport
                joined = cycle.transport = _HeadHold(real, pending)
                try:
                    await self._send_body(cycle, send, message, step)
                finally:
                    cycle.transport = real
                    if joined.head is not None and not real.is_closing():
                        real.write(joined.head)  # no body write came (HEAD, a refused body): the head alone
                return
            if kind != "http.response.body" or cycle.response_complete:
                await send(message)
                return
            await self._send_body(cycle, send, message, step)

        return guarded

    async def _send_body(self, cycle: Any, send: Any, message: Any, step: int) -> None:
        """One ``http.response.body`` message: a large body in ``step``-sized writes, the last one
        waiting for the buffer to drain (see ``_guarded_send``)."""
        flow = self.flow
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if not more and not cycle.keep_alive and cycle.more_body and not cycle.disconnected:
            if self.limits.body_discard_bytes and not cycle.waiting_for_100_continue:
                cycle.keep_alive = True  # uvicorn would close now: unread body bytes -> reset
                self._linger_wanted = True
        self._held = len(body)
        try:
            if len(body) > step:
                view = memoryview(body)
                for offset in range(0, len(body) - step, step):
                    await send({"type": "http.response.body", "body": view[offset : offset + step],
                                "more_body": True})  # fmt: skip
                    if cycle.disconnected:
                        return
                body = view[offset + step :]
            await send({"type": "http.response.body", "body": body, "more_body": more})
            if flow.write_paused and not cycle.disconnected:
                await flow.drain()  # woken when drained, or by connection_lost (deadline, bound)
        finally:
            self._held = 0
            if not flow.write_paused and self._send_deadline is not None:
                self._send_deadline.cancel()
                self._send_deadline = None

    # --- deadlines ----------------------------------------------------------------------------------
    def _arm(self, delay: float, callback: Any) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_expired(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._got_bytes:
            self.transport.write(_canned(b"408 Request Timeout",
                f"request head not received within {self.limits.header_timeout_s:g} s"))  # fmt: skip
        self.transport.close()

    def _body_expired(self) -> None:
        self._deadline = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None:
            return
        if not cycle.response_started:
            cycle.response_started = True  # the application's own answer, if any, is dropped
            self.transport.write(_canned(b"408 Request Timeout",
                f"request body not received within {self.limits.body_timeout_s:g} s"))  # fmt: skip
        cycle.disconnected = True
        cycle.message_event.set()
        self.transport.close()

    # --- parser callbacks and data ----------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self._chunk = len(data)
        if self._linger:
            self._discarded += len(data)
            if self._discarded > self.limits.body_discard_bytes:
                self.transport.close()  # enough: the rest is refused with a reset
                return
        if self._in_head:  # an upper bound of the head's size (the chunk may carry body bytes too)
            self._head_bytes += self._chunk
        super().data_received(data)
        too_long = self._in_head and self._head_bytes > self.limits.max_header_bytes
        if too_long and not self.transport.is_closing():  # a head still arriving, already too long
            self._disarm()
            self.transport.write(_HEAD_TOO_LARGE)
            self.transport.close()

    def _head_size(self) -> int:
        """The exact size of the request head just parsed (only computed when the bound says maybe)."""
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._idle.pop(self, None)
        self._got_bytes = True
        if not self._in_head:  # a later request on a kept-alive connection
            self._in_head = True
            self._head_bytes = self._chunk  # the chunk it starts in (an upper bound again)
            self._arm(self.limits.header_timeout_s, self._head_expired)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._arm(self.limits.body_timeout_s, self._body_expired)
        limit = self.limits.max_header_bytes
        if self._head_bytes > limit and self._head_size() > limit:  # complete but too long: answered 431
            app, self.app = self.app, _head_too_large
            try:
                super().on_headers_complete()
            finally:
                self.app = app
        else:
            super().on_headers_complete()
        self._head_bytes = 0
        if self._shutting_down and self.cycle is not None:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        self._disarm()
        if self._linger:  # the body of a request answered early has all been read: now close
            self._linger = False
            self.transport.close()
            return
        if self._linger_wanted and self.cycle is not None:  # it all came before the answer went out
            self._linger_wanted = False
            self.cycle.keep_alive = False  # closed after the answer, as uvicorn would
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._linger_wanted:  # answered early: read (and discard) the rest of the body, then close
            self._linger_wanted = False
            self._linger = True
            if self.timeout_keep_alive_task is not None:
                self.timeout_keep_alive_task.cancel()  # the body deadline (still armed) bounds it
                self.timeout_keep_alive_task = None
            return
        if not self.pipeline and not self.transport.is_closing() and self._in_head is False:
            self._got_bytes = False
            self._idle[self] = None

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        self._idle.pop(self, None)
        super().handle_websocket_upgrade()


def event_loop_name() -> str:
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The loop every server command runs on: uvloop where installed (as uvicorn's ``loop="uvloop"``)."""
    if event_loop_name() == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def run(coro: Any) -> Any:
    """``asyncio.run`` on ``new_event_loop()``."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


def limits_from(settings: ServerSettings) -> ServerLimits:
    return ServerLimits(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_header_bytes=settings.max_header_bytes,
        max_connections=connection_cap(settings.max_connections),
        send_timeout_s=settings.send_timeout_s,
        send_buffer_bytes=settings.send_buffer_bytes,
        send_buffer_total_bytes=settings.send_buffer_total_bytes,
        body_discard_bytes=settings.body_discard_bytes,
    )


def server_config(app: Any, settings: ServerSettings, **extra: Any) -> uvicorn.Config:
    """``uvicorn.Config`` for the gateway with the guards above; ``extra`` overrides uvicorn options."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "loop": event_loop_name(),
        "http": GuardedHttpToolsProtocol,
        "timeout_keep_alive": settings.keepalive_timeout_s,
        # No permessage-deflate on WebSockets: uvicorn compresses (and inflates) frames on the event loop, and
        # a 7.4 MB answer frame took 0.6 s to compress there (a 4 MiB client frame ~20 ms to inflate), while
        # every other request waited. Frames travel as sent.
        "ws_per_message_deflate": False,
        "backlog": 2048,
        # X-Forwarded-For names the client only when a trusted proxy (TGW_TRUSTED_PROXIES) sent it; uvicorn
        # would trust 127.0.0.1 by default, so any local client could pick its own address
        "proxy_headers": bool(settings.trusted_proxies),
        "forwarded_allow_ips": list(settings.trusted_proxies) or None,
    }
    options.update(extra)
    config = uvicorn.Config(app, **options)
    config.tgw_limits = limits_from(settings)  # type: ignore[attr-defined]
    return config
