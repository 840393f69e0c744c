"""The request context: the request id (a context variable for logs and errors) and ``RequestContext``, the
one object each door builds per call and hands to the core (``app.services.inference``)."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

_request_id: ContextVar[str | None] = ContextVar("tgw_request_id", default=None)
_VALID_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


class _Ids:
    """32 hex digits: a random 64-bit prefix per process (drawn again in a forked child) and a counter;
    unique without a ``getrandom`` call per request (measured ~3 % of a cache miss's CPU)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)

    def next(self) -> str:
        return f"{self.prefix}{next(self.counter) & 0xFFFFFFFFFFFFFFFF:016x}"


_ids = _Ids()
os.register_at_fork(after_in_child=_ids.reset)


def current_request_id() -> str | None:
    return _request_id.get()


def request_id_for(value: str | None) -> str:
    """The caller's id when it is sane, else a generated one."""
    return value if value and _VALID_ID.match(value) else _ids.next()


def set_request_id(value: str | None) -> str:
    """Use the caller's id when it is sane, else generate one; returns the id in effect."""
    rid = request_id_for(value)
    _request_id.set(rid)
    return rid


def route_path(scope: Mapping[str, Any]) -> str:
    """The request path as the application routes it: without the ``root_path`` a proxy mounted it under."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


@dataclass(slots=True)
class Caller:
    """What the caller's key decides about every call it makes, whatever the request asks for: the tier's
    Triton ``priority`` (0: Triton's default) and timeout bound (``max_timeout_s``), and the response-cache
    ``cache_scope`` ("" shared, or the tenant). ``app.auth.Principal`` is one (with the key's limits)."""

    key_id: str
    tenant: str
    tier: str
    priority: int = 0
    max_timeout_s: float | None = None
    cache_scope: str = ""
    max_stream_s: float | None = None  # the tier's bound on a stream's life (None: the gateway's)


@dataclass(slots=True)
class Routed:
    """A request routed by its model's traffic policy (``app.services.traffic``): the version chosen, the
    policy revision it was chosen under, and the shadow version its inputs also go to (None: not sampled)."""

    model: str
    version: str
    revision: int
    shadow: str | None = None


Door = Literal["v1", "v2", "grpc", "grpc_stream", "ws", "job"]


@dataclass(slots=True)
class RequestContext:
    """One call to the core, built once at the door that received it (``open``) and handed to
    ``InferenceService.infer(request, ctx)`` / ``stream(request, ctx)``, which apply it the same way for
    every door: the request id (validated: the caller's when sane, else generated) goes to Triton and the
    logs, the caller's key bounds priority, timeout and cache scope, the cache directives
    (``Cache-Control``) choose reads and writes, the deadline (a gRPC client's, else the gateway's
    ``TGW_TRITON_TIMEOUT_S``) bounds the whole call, and ``cancelled`` (set by the door when its client
    went away) ends a stream early."""

    request_id: str
    door: Door
    caller: Caller | None = None
    cache_read: bool = True
    cache_write: bool = True
    deadline: float | None = None  # time.monotonic() by which the caller wants its answer; None: no own bound
    cancelled: asyncio.Event | None = None
    traffic: Routed | None = None  # ``InferenceService.resolve``: a traffic policy chose the version

    @classmethod
    def open(
        cls, door: Door, request_id: str | None, caller: Caller | None = None, *,
        cache_control: str | None = None, deadline: float | None = None,
    ) -> RequestContext:  # fmt: skip
        """The context of a request arriving at ``door``, in the task that serves it: ``request_id`` as
        the caller sent it (validated here, for every door, and made the task's id for the logs),
        ``cache_control`` its ``Cache-Control`` (``no-cache`` skips the read, ``no-store`` the write),
        ``deadline`` the caller's own (a ``time.monotonic()`` instant)."""
        read, write = cache_directives(cache_control)
        return cls(set_request_id(request_id), door, caller, read, write, deadline)


def cache_directives(header: str | None) -> tuple[bool, bool]:
    """``Cache-Control: no-cache`` skips the read, ``no-store`` the write. Returns (read, write)."""
    if not header:
        return True, True
    tokens = {t.strip().split("=", 1)[0].lower() for t in header.split(",")}
    return "no-cache" not in tokens, "no-store" not in tokens
