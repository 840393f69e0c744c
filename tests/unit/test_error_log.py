"""The unhandled-error log line (issue 19): it carries the request id the client's answer points to, every
distinct error's first traceback is logged in full although one place logs them all (the repeat filter
folds only repeats of the same error), and a client's unencodable text (a lone surrogate) never loses the
line."""

from __future__ import annotations

import io
import logging

import orjson

from app.errors import log_unhandled
from app.observability.logging import JsonFormatter, RepeatFilter
from app.request_context import set_request_id


def _handler() -> tuple[logging.Handler, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter(10.0))
    return handler, out


def _raise(kind: type[Exception], text: str) -> Exception:
    try:
        raise kind(text)
    except Exception as exc:
        return exc


def test_distinct_errors_from_one_place_each_log_their_first_traceback() -> None:
    handler, out = _handler()
    logger = logging.getLogger("app.errors")
    logger.addHandler(handler)
    try:
        set_request_id("req-first")
        log_unhandled(_raise(ValueError, "first"))
        set_request_id("req-second")
        log_unhandled(_raise(KeyError, "second"))  # within 10 s, same log call: a different error
        set_request_id("req-again")
        log_unhandled(_raise(ValueError, "first"))  # the same error again: folded
    finally:
        logger.removeHandler(handler)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["req-first", "req-second"]
    assert "ValueError: first" in lines[0]["exc"] and "KeyError: 'second'" in lines[1]["exc"]


def test_a_lone_surrogate_does_not_lose_the_line() -> None:
    handler, out = _handler()
    logger = logging.getLogger("app.errors")
    logger.addHandler(handler)
    try:
        set_request_id("req-surrogate")
        log_unhandled(_raise(ValueError, "name \ud800 from a client"))
    finally:
        logger.removeHandler(handler)
    [line] = out.getvalue().splitlines()
    record = orjson.loads(line)
    assert record["request_id"] == "req-surrogate" and "ValueError: name \\ud800" in record["exc"]
