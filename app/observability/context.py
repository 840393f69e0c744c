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
