"""TGW_ACCESS_LOG_SAMPLE: evenly spaced lines for answered requests, every error's line."""

from __future__ import annotations

import logging

import pytest

from app.observability.context import RequestInfo
from app.observability.requests import Requests


def _lines(requests: Requests, statuses: list[int | str], caplog: pytest.LogCaptureFixture) -> list[object]:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app.access"):
        for i, status in enumerate(statuses):
            if isinstance(status, str):
                requests.grpc(f"r{i}", "ModelInfer", status, 0.001, RequestInfo())
            else:
                requests.http(f"r{i}", "POST", "/v2/models/m/infer", "/v2/models/{m}/infer", status, 0.001,
                              RequestInfo())  # fmt: skip
    return [getattr(r, "status", None) for r in caplog.records if r.name == "app.access"]


def test_every_line_by_default(caplog: pytest.LogCaptureFixture) -> None:
    assert _lines(Requests(), [200] * 10, caplog) == [200] * 10


def test_a_share_of_answered_requests_and_every_error(caplog: pytest.LogCaptureFixture) -> None:
    statuses: list[int | str] = [200] * 100 + [400, 429, 503, "UNAVAILABLE"] + ["OK"] * 100
    logged = _lines(Requests(access_log_sample=0.1), statuses, caplog)
    assert logged.count(200) == 10 and logged.count("OK") == 10  # one in ten, evenly spaced
    assert [s for s in logged if s not in (200, "OK")] == [400, 429, 503, "UNAVAILABLE"]


def test_zero_logs_errors_only(caplog: pytest.LogCaptureFixture) -> None:
    assert _lines(Requests(access_log_sample=0.0), [200, 201, 404, 200, 500], caplog) == [404, 500]
