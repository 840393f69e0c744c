"""How the cancellation proofs know the model stopped: ``forecast_stream`` logs "forecast_stream: cancelled
after N of M steps" into Triton's log when it sees Triton's cancellation flag between two steps."""

from __future__ import annotations

from app.launcher import EmbeddedTriton
from tests.eventually import eventually

CANCELLED = "forecast_stream: cancelled after"


def cancelled_lines(triton: EmbeddedTriton, horizon: int | None = None) -> list[str]:
    """The model's cancellation lines, of requests of ``horizon`` (M) steps when given (a test whose long
    request has a horizon of its own reads only its own line)."""
    log = triton.process.log_path.read_text(errors="replace").splitlines()
    return [s for s in log if CANCELLED in s and (horizon is None or f" of {horizon} steps" in s)]


def cancelled_after(
    triton: EmbeddedTriton, before: int, horizon: int | None = None, first: bool = False
) -> int:
    """N of the newest cancellation line (``first``: of the first after the ``before`` there were), once
    there is one more than ``before``; printed."""

    def line() -> str:
        lines = cancelled_lines(triton, horizon)
        assert len(lines) > before
        return lines[before] if first else lines[-1]

    found = eventually(line, 10, 0.1, "the model's log line about the cancellation")
    print(found)
    return int(found.split(CANCELLED)[1].split(" of ")[0])
