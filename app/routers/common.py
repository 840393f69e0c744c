"""Helpers shared by routers: JSON bodies and responses with orjson."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request
from starlette.responses import Response

from app.services.payload import parse_json

_ORJSON_OPTS = orjson.OPT_SERIALIZE_NUMPY


class ORJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_ORJSON_OPTS)


async def read_json(request: Request) -> Any:
    return parse_json(await request.body())
