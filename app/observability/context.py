"""What a request did, for its log line: the middleware puts a ``RequestInfo`` in a context variable, the
services fill in model, version and cache outcome (``annotate``), the middleware logs it at the end.

The context variable holds a mutable object, so a value set in a child task (which runs in a copy of the
context) is still seen by the middleware.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestInfo:
    model: str | None = None
    version: str | None = None
    cache: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds (Server-Timing)
    # Usage metering (app.services.usage), filled in by the inference service once it serves the request
    # (``note_usage``): a request the services never saw (a refused one, a health probe) is not metered.
    door: str | None = None  # the RequestContext's door; None: not an inference request
    tenant: str = ""
    key_id: str = ""
    rows: int = 0  # the batch dimension of the request (1 for a model without one)
    bytes_in: int = 0  # input tensor bytes (whatever the wire encoding)
    bytes_out: int = 0  # output tensor bytes, summed over a stream's responses
    compute_s: float = 0.0  # Triton time attributed to this request
    saved_s: float = 0.0  # compute a cache hit or a shared call saved (what the answer cost when made)
    follower: bool = False  # answered by another request's Triton call (single-flight)
    responses: int = 0  # a stream's responses


_current: ContextVar[RequestInfo | None] = ContextVar("tgw_request_info", default=None)


def begin_request() -> RequestInfo:
    info = RequestInfo()
    _current.set(info)
    return info


def annotate(model: str | None = None, version: str | None = None, cache: str | None = None) -> None:
    """Record facts about the current request (no-op outside one, e.g. in a job worker)."""
    info = _current.get()
    if info is None:
        return
    if model is not None:
        info.model = model
    if version is not None:
        info.version = version
    if cache is not None:
        info.cache = cache


def add_timing(stage: str, seconds: float) -> None:
    """Time spent in a stage of the current request (``cache``, ``queue``, ``triton``), summed."""
    info = _current.get()
    if info is not None and seconds > 0:
        info.timings[stage] = info.timings.get(stage, 0.0) + seconds


def note_usage(door: str, tenant: str, key_id: str, rows: int, bytes_in: int) -> None:
    """The current request reached the inference service (it is metered when it ends)."""
    info = _current.get()
    if info is not None:
        info.door, info.tenant, info.key_id, info.rows, info.bytes_in = door, tenant, key_id, rows, bytes_in


def note_answer(bytes_out: int, compute_s: float = 0.0, saved_s: float = 0.0, follower: bool = False) -> None:
    """What the current request's answer weighed and cost (a stream: each response, summed)."""
    info = _current.get()
    if info is not None:
        info.bytes_out += bytes_out
        info.compute_s += compute_s
        info.saved_s += saved_s
        if follower:
            info.follower = True


def note_response() -> None:
    info = _current.get()
    if info is not None:
        info.responses += 1
