"""Structured logs: one JSON object per line on stderr, for our loggers and uvicorn's alike.

``log_config(level, fmt)`` is a ``logging.config.dictConfig`` dict; it is passed to ``uvicorn.Config`` as
``log_config`` (so every uvicorn worker process applies it too) and applied by the CLI before start-up.
uvicorn's access log is off: ``app.access`` writes one line per request instead (see
``app.pipeline``). Fields passed with ``extra=`` become top-level keys; payloads are
never logged.

Example (``TGW_LOG_FORMAT=json``, the default)::

    {"ts":"2025-01-01T12:00:00.123Z","level":"INFO","logger":"app.access","msg":"request",
     "request_id":"3f2a...","method":"POST","path":"/v1/models/identity_fp32/infer","status":200,
     "duration_ms":2.41,"model":"identity_fp32","version":"1","cache":"MISS"}
"""

from __future__ import annotations

import logging
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
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """Human-readable, for a terminal: the message followed by the extra fields as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = [
            f"{k}={v}" for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")
        ]
        return f"{line} {' '.join(extras)}" if extras else line


def log_config(level: str = "INFO", fmt: str = "json") -> dict[str, Any]:
    formatter = "app.observability.logging.JsonFormatter" if fmt == "json" else (
        "app.observability.logging.TextFormatter"
    )  # fmt: skip
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": {"()": formatter}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "default",
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


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    import logging.config

    logging.config.dictConfig(log_config(level, fmt))
