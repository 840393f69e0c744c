"""Request-body decoding shared by the HTTP and WebSocket entry points."""

from __future__ import annotations

import json
from typing import Any

import orjson

from app.errors import BadRequest


def parse_json(raw: bytes | str) -> Any:
    """Strict JSON via orjson. Bodies with NaN/Infinity literals (what Python's json.dumps writes) are
    accepted here so that validation can answer 422 naming the input, rather than a vague 400."""
    if not raw:
        raise BadRequest("request body is empty; expected JSON", {"field": "body"})
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest(f"request body is not valid JSON: {exc}", {"field": "body"}) from None
