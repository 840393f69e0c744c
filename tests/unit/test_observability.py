"""Observability and lifecycle pieces without Triton: log format, jobs metrics hook, tracing, settings
errors, the start-up wait."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import subprocess
import sys
import time

import httpx
import orjson
import pytest
from fastapi import FastAPI

from app.lifecycle import Lifecycle
from app.observability import metrics, tracing
from app.observability.logging import JsonFormatter, log_config
from tests.eventually import eventually_async


def _get(app: FastAPI, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, headers=headers)

    return asyncio.run(go())


def test_json_formatter_one_line_with_extras() -> None:
    record = logging.makeLogRecord({
        "name": "app.access", "levelno": logging.INFO, "levelname": "INFO", "msg": "request",
        "request_id": "abc", "status": 200, "duration_ms": 1.5,
    })  # fmt: skip
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = orjson.loads(line)
    assert out["msg"] == "request" and out["logger"] == "app.access" and out["level"] == "INFO"
    assert out["request_id"] == "abc" and out["status"] == 200 and out["duration_ms"] == 1.5
    assert out["ts"].endswith("Z")


def test_uvicorn_loggers_use_the_json_formatter() -> None:
    import logging.config

    config = log_config("INFO", "json")
    config["handlers"]["default"]["stream"] = "ext://sys.stdout"
    buf = io.StringIO()
    saved = sys.stdout
    sys.stdout = buf
    try:
        logging.config.dictConfig(config)
        logging.getLogger("uvicorn.error").info("Started server process [%d]", 42)
        logging.getLogger("uvicorn.access").info("should be silent")
    finally:
        sys.stdout = saved
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    lines = [orjson.loads(x) for x in buf.getvalue().splitlines()]
    assert lines == [{**lines[0], "logger": "uvicorn.error", "msg": "Started server process [42]"}]


def test_metrics_endpoint_includes_jobs_snapshot_and_counters() -> None:
    app = FastAPI()
    app.add_route("/metrics", metrics.metrics_endpoint)

    async def snapshot() -> metrics.JobsSnapshot:
        return metrics.JobsSnapshot(queue_depth=7, oldest_pending_age_seconds=12.5)

    metrics.register_jobs_snapshot(app, snapshot)
    metrics.record_job("succeeded")
    metrics.record_webhook_delivery("success")
    metrics.websocket_opened()
    text = _get(app, "/metrics").text
    metrics.websocket_closed()
    assert "tgw_jobs_queue_depth 7.0" in text
    assert "tgw_jobs_oldest_pending_age_seconds 12.5" in text
    assert 'tgw_jobs_total{status="succeeded"}' in text
    assert 'tgw_webhook_deliveries_total{outcome="success"}' in text
    assert "tgw_websockets_open 1.0" in text


def test_metrics_endpoint_survives_a_failing_snapshot() -> None:
    app = FastAPI()
    app.add_route("/metrics", metrics.metrics_endpoint)

    async def broken() -> metrics.JobsSnapshot:
        raise ConnectionError("redis down")

    metrics.register_jobs_snapshot(app, broken)
    r = _get(app, "/metrics")
    assert r.status_code == 200 and "tgw_jobs_queue_depth" not in r.text
    assert "tgw_cache_requests_total" in r.text


def test_tracing_spans_and_traceparent_injection() -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    assert not tracing.enabled()
    assert tracing.span("x") is tracing.span("y")  # the shared no-op when off
    exporter = InMemorySpanExporter()
    tracing.setup_tracing(None, exporter=exporter)
    try:
        app = FastAPI()

        @app.get("/work/{item}")
        async def work(item: str) -> dict[str, str]:
            headers: dict[str, str] = {}
            with tracing.span("triton.infer"):
                tracing.inject(headers)
            return headers

        from app.frontends.http.pipeline import Pipeline

        app.add_middleware(Pipeline, max_body_bytes=1 << 20)
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        injected = _get(app, "/work/a", headers={"traceparent": parent}).json()
    finally:
        tracing.shutdown_tracing()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"GET /work/{item}", "triton.infer"}
    server, child = spans["GET /work/{item}"], spans["triton.infer"]
    assert f"{server.context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    assert child.parent is not None and child.parent.span_id == server.context.span_id
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 200
    assert injected["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert injected["traceparent"].split("-")[2] == f"{child.context.span_id:016x}"
    assert not tracing.enabled()


async def test_lifecycle_drain_sets_targets_and_runs_hooks() -> None:
    class Health:
        draining = False

    lifecycle, health, ran = Lifecycle(), Health(), []

    async def stop_consumers() -> None:
        ran.append("drain")

    def plain() -> None:
        ran.append("plain")

    lifecycle.watch(health)
    lifecycle.drain_hooks += [stop_consumers, plain]
    lifecycle.activate()
    try:
        lifecycle.begin_drain()
        assert lifecycle.draining and health.draining
        await eventually_async(lambda: sorted(ran) == ["drain", "plain"], 10, 0.005)
        lifecycle.begin_drain()  # a second signal runs nothing twice
        await asyncio.sleep(0.05)  # a real wait: a second run of the hooks, were there one, has time to run
    finally:
        lifecycle.deactivate()
    assert sorted(ran) == ["drain", "plain"]


def _tgw(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TGW_")}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "serve"], env={**clean, **env}, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_bad_settings_fail_fast_naming_variable_and_value() -> None:
    proc = _tgw({"TGW_PORT": "eighty", "TGW_WEBHOOK_SECRET": "", "TGW_REDIS_URL": "http://u:hunter2@h:1"})
    assert proc.returncode == 2
    assert "TGW_PORT='eighty': Input should be a valid integer" in proc.stderr
    assert "TGW_REDIS_URL='http://u:***@h:1'" in proc.stderr and "hunter2" not in proc.stderr


def test_serve_waits_for_triton_then_gives_up_clearly() -> None:
    env = {
        "TGW_TRITON_URL": "127.0.0.1:1", "TGW_REDIS_URL": "redis://127.0.0.1:1/0",
        "TGW_STARTUP_WAIT_S": "1", "TGW_STARTUP_RETRY_INTERVAL_S": "0.25",
    }  # fmt: skip
    t0 = time.monotonic()
    proc = _tgw(env)
    assert time.monotonic() - t0 < 15
    assert proc.returncode == 1
    lines = [orjson.loads(x) for x in proc.stderr.splitlines()]
    waiting = [x["msg"] for x in lines if x["msg"].startswith("waiting for Triton")]
    assert waiting == [f"waiting for Triton at 127.0.0.1:1 (attempt {i}/4)" for i in range(1, 5)]
    assert lines[-1]["level"] == "ERROR"
    assert "Triton at 127.0.0.1:1 did not answer after 4 attempts" in lines[-1]["msg"]
    assert "TGW_TRITON_URL" in lines[-1]["msg"]
