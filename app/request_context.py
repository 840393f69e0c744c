"""Per-request context (the request id) shared by middleware, services and error handlers."""

from __future__ import annotations

import os
import re
from contextvars import ContextVar

_request_id: ContextVar[str | None] = ContextVar("tgw_request_id", default=None)
_VALID_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def current_request_id() -> str | None:
    return _request_id.get()


def set_request_id(value: str | None) -> str:
    """Use the caller's id when it is sane, else generate one; returns the id in effect."""
    rid = value if value and _VALID_ID.match(value) else os.urandom(16).hex()
    _request_id.set(rid)
    return rid
