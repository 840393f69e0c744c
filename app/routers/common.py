"""Helpers shared by routers: JSON responses with orjson, and ``Reply`` -> Starlette ``Response``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import Request
from starlette.responses import JSONResponse

from app.codecs.common import JSON, OCTET_STREAM, Reply, dumps
from app.services.payload import parse_json

__all__ = ["JSON", "OCTET_STREAM", "Headers", "ORJSONResponse", "Reply", "dumps", "read_json"]

Headers = Mapping[bytes, bytes]  # lower-case raw header names -> values (ASGI)


class ORJSONResponse(JSONResponse):
    """JSON written by orjson. A ``JSONResponse`` subclass so that FastAPI documents the route's
    ``response_model`` in the OpenAPI document (any other response class is declared a bare string)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


async def read_json(request: Request) -> Any:
    return parse_json(await request.body())
