"""The one timestamp format of every answer (jobs, webhook attempts, keys): ISO 8601 in UTC with
milliseconds and a ``Z``, e.g. ``2026-12-06T05:36:02.123Z``. Stored values stay Unix seconds."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(ts: float | None) -> str | None:
    if not ts:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
