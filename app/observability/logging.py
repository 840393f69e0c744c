"""Structured logs: one JSON object per line on stderr, for our loggers and uvicorn's alike.

``log_config(level, fmt)`` is a ``logging.config.dictConfig`` dict; it is passed to ``uvicorn.Config`` as
``log_config`` (so every uvicorn worker process applies it too) and applied by the CLI before start-up.
uvicorn's access log is off: ``app.access`` writes one line per request instead (see
``app.frontends.http.pipeline``). Fields passed with ``extra=`` become top-level keys; payloads are
never logged.

Example (``TGW_LOG_FORMAT=json``, the default)::

    {"ts":"2025-01-01T12:00:00.123Z","level":"INFO","logger":"app.access","msg":"request",
     "request_id":"3f2a...","method":"POST","path":"/v1/models/identity_fp32/infer","status":200,
     "duration_ms":2.41,"model":"identity_fp32","version":"1","cache":"MISS"}
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import orjson

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is emitted.
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", **extra}`` on one line; exceptions under ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc"] = record.exc_text
        try:
            return orjson.dumps(out, default=str).decode()
        except orjson.JSONEncodeError:  # e.g. a lone surrogate from a client's text: escaped, never lost
            safe = {k: _utf8(v if isinstance(v, (int, float, bool)) or v is None else str(v))
                    for k, v in out.items()}  # fmt: skip
            return orjson.dumps(safe).decode()


def _utf8(value: Any) -> Any:
    """Text that is not valid UTF-8 (lone surrogates) with the offending code points as ``\\udXXX``."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value


_CONTROL = {i: f"\\x{i:02x}" for i in range(32) if i != 9} | {0x7F: "\\x7f", 0x0A: "\\n", 0x0D: "\\r"}


def escape_control(text: str) -> str:
    """CR, LF and other control characters as visible escapes: a value from a client (a path, a
    header) cannot start a forged log line."""
    return text.translate(_CONTROL)


class TextFormatter(logging.Formatter):
    """Human-readable, for a terminal: the message followed by the extra fields as key=value. One record
    is one line: control characters in the message and the fields are escaped (only a traceback spans
    several lines, each of its continuation lines indented by Python)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape_control(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            escape_control(f"{k}={v}")
            for k, v in record.__dict__.items()
            if k not in _RESERVED and not k.startswith("_")
        ]
        return f"{line} {' '.join(extras)}" if extras else line


# Parts of a message that differ between repeats of one event: object addresses, timestamps, long ids.
_VOLATILE = re.compile(r"0x[0-9a-fA-F]+|\d{4,}(?:\.\d+)?")


class RepeatFilter(logging.Filter):
    """Log-flood protection: a WARNING or worse repeated (same logger, place and text, object addresses
    and numbers of 4+ digits aside) passes once per ``interval_s``; the repeats in between are counted,
    and the next one that passes carries ``repeated=<count>`` (text: a field; JSON: a key). Below WARNING
    nothing is filtered (the access log is one line per request by design). ``interval_s`` 0 turns it off.
    A record with an exception is also told apart by the exception's type and the place it was raised,
    so the first traceback of every distinct error is logged in full.

    Without it, 20,500 idle sockets exhausting the file descriptors wrote 115 MB of identical accept
    errors in 25 s (stock asyncio; tests/unit/test_server_hardening.py reproduces it: 7.9 MB -> 2.7 KB)."""

    def __init__(self, interval_s: float = 10.0) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._seen: dict[tuple[str, int, str, int, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if self.interval_s <= 0 or record.levelno < logging.WARNING:
            return True
        text = _VOLATILE.sub("#", record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            text += "\0" + _raised_at(record.exc_info[1])
        key = (record.name, record.levelno, record.pathname, record.lineno, text)
        now = record.created
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval_s:
            self._seen[key] = (last[0], last[1] + 1)
            return False
        if last is not None and last[1]:
            record.repeated = last[1]
        if len(self._seen) > 4096:  # bounded: forget the oldest places
            for old in sorted(self._seen, key=lambda k: self._seen[k][0])[:1024]:
                del self._seen[old]
        self._seen[key] = (now, 0)
        return True


def _raised_at(exc: BaseException) -> str:
    """``Type@file:line`` of the innermost frame of an exception's traceback (its chain's first cause
    too): what tells two different errors logged from one place apart."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(parts) < 3:
        tb = seen.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
        parts.append(f"{type(seen).__qualname__}@{where}")
        seen = seen.__cause__ or seen.__context__
    return "|".join(parts)


def log_config(level: str = "INFO", fmt: str = "json", repeat_interval_s: float = 10.0) -> dict[str, Any]:
    formatter = "app.observability.logging.JsonFormatter" if fmt == "json" else (
        "app.observability.logging.TextFormatter"
    )  # fmt: skip
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": formatter}},
        "filters": {
            "repeats": {"()": "app.observability.logging.RepeatFilter", "interval_s": repeat_interval_s}
        },
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
                "filters": ["repeats"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            # uvicorn's loggers propagate to the root handler; their own handlers are removed.
            "uvicorn": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.error": {"handlers": [], "level": level, "propagate": True},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


def configure_logging(level: str = "INFO", fmt: str = "json", repeat_interval_s: float = 10.0) -> None:
    import logging.config

    logging.config.dictConfig(log_config(level, fmt, repeat_interval_s))
