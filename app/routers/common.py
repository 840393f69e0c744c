"""Helpers shared by routers: orjson JSON responses (``app.web``), ``Reply`` -> Starlette ``Response``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Request

from app.codecs.common import JSON, OCTET_STREAM, Reply, dumps
from app.services.payload import parse_json
from app.web import ORJSONResponse  # every HTTP door's (app.auth's routes too)

__all__ = ["JSON", "OCTET_STREAM", "Headers", "ORJSONResponse", "Reply", "dumps", "read_json"]

Headers = Mapping[bytes, bytes]  # lower-case raw header names -> values (ASGI)


async def read_json(request: Request) -> Any:
    return parse_json(await request.body())
