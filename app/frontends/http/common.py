"""Helpers shared by the HTTP doors: orjson JSON responses (``app.frontends.http.web``), ``Reply`` ->
Starlette ``Response``, header lookup, the caller's tenant."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Request
from starlette.requests import HTTPConnection

from app.codecs.common import JSON, OCTET_STREAM, Reply, dumps
from app.frontends.http.web import ORJSONResponse  # every HTTP door's (app.auth's routes too)
from app.services.payload import parse_json

__all__ = [
    "JSON", "OCTET_STREAM", "Headers", "ORJSONResponse", "Reply", "dumps", "header_value", "owner_of",
    "read_json",
]  # fmt: skip

Headers = Mapping[bytes, bytes]  # lower-case raw header names -> values (ASGI)


async def read_json(request: Request) -> Any:
    return parse_json(await request.body())


def header_value(headers: Headers, name: bytes) -> str | None:
    value = headers.get(name)
    return value.decode("latin-1") if value is not None else None


def owner_of(conn: HTTPConnection) -> str:
    """The tenant that owns the jobs this connection submits and sees: set on ``conn.state.tenant`` by
    the authentication stage (keys issue); "" while authentication is off."""
    return str(getattr(conn.state, "tenant", "") or "")
