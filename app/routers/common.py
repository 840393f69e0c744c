"""Helpers shared by routers: JSON bodies and responses with orjson, and ``Reply``, the transport-neutral
answer of the infer handlers (the FastAPI routes and ``app.hotpath`` send the same bytes)."""

from __future__ import annotations

from typing import Any, NamedTuple

import orjson
from fastapi import Request
from starlette.responses import JSONResponse, Response

from app.services.payload import parse_json

_ORJSON_OPTS = orjson.OPT_SERIALIZE_NUMPY

JSON = b"application/json"
OCTET_STREAM = b"application/octet-stream"


class ORJSONResponse(JSONResponse):
    """JSON written by orjson. A ``JSONResponse`` subclass so that FastAPI documents the route's
    ``response_model`` in the OpenAPI document (any other response class is declared a bare string)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=_ORJSON_OPTS)


def dumps(content: Any) -> bytes:
    return orjson.dumps(content, option=_ORJSON_OPTS)


async def read_json(request: Request) -> Any:
    return parse_json(await request.body())


class Reply(NamedTuple):
    """Status, body, content type and extra headers (lower-case names) of an answer."""

    status: int
    body: bytes
    content_type: bytes = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def response(self) -> Response:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers}
        return Response(self.body, self.status, headers, media_type=self.content_type.decode("latin-1"))
