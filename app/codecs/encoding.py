"""HTTP content codings for ``/v2`` (what ``tritonclient.http`` sends with
``request_compression_algorithm`` and asks for with ``response_compression_algorithm``): ``gzip`` and
``deflate`` request bodies, decompressed with a bound on the decompressed size (a small compressed body
must not expand without limit), and answers compressed when ``Accept-Encoding`` asks for it.
"""

from __future__ import annotations

import gzip
import zlib

from app.codecs.common import Reply
from app.errors import BadRequest, PayloadTooLarge

SUPPORTED = ("gzip", "deflate")
_CHUNK = 1 << 16


def decode_body(raw: bytes, content_encoding: str | None, limit: int) -> bytes:
    """The body as sent before compression; 413 when it would exceed ``limit`` bytes (TGW_MAX_BODY_BYTES)."""
    coding = (content_encoding or "").strip().lower()
    if coding in ("", "identity"):
        return raw
    if coding not in SUPPORTED:
        raise BadRequest(f"Content-Encoding: {coding} is not supported; use gzip or deflate",
                         {"field": "Content-Encoding"})  # fmt: skip
    # gzip, or deflate as zlib data (RFC 9110; what tritonclient sends); raw deflate is accepted too
    attempts = (zlib.MAX_WBITS | 16,) if coding == "gzip" else (zlib.MAX_WBITS, -zlib.MAX_WBITS)
    for wbits in attempts:
        try:
            return _inflate(raw, wbits, limit)
        except zlib.error as exc:
            error = exc
    raise BadRequest(f"request body is not valid {coding} data: {error}", {"field": "body"})


def _inflate(raw: bytes, wbits: int, limit: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(raw, limit + 1)
    if len(out) > limit:
        raise PayloadTooLarge(
            f"request body decompresses to more than the limit of {limit} bytes (TGW_MAX_BODY_BYTES)",
            {"limit_bytes": limit},
        )
    if not inflater.eof:
        raise zlib.error("truncated data")
    return out


def accepted(accept_encoding: str | None) -> str | None:
    """The first coding of ``Accept-Encoding`` the gateway produces (q=0 excluded), or None."""
    for item in (accept_encoding or "").split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        if name in SUPPORTED and params.replace(" ", "") not in ("q=0", "q=0.0"):
            return name
    return None


def encode_reply(reply: Reply, accept_encoding: str | None) -> Reply:
    coding = accepted(accept_encoding)
    if coding is None or not reply.body:
        return reply
    body = gzip.compress(reply.body, 1) if coding == "gzip" else zlib.compress(reply.body, 1)
    return reply._replace(body=body, headers=(*reply.headers, (b"content-encoding", coding.encode())))
