"""Operations end to end: /metrics after real traffic (one process and two workers), the access-log line,
and SIGTERM under load against a real ``tgw serve`` process."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.launcher import EmbeddedRedis, EmbeddedTriton
from app.observability.logging import JsonFormatter
from tests.eventually import eventually
from tests.integration.jobs_helpers import unique_row
from tests.processes import TgwProcess, clean_env, tgw_serve

pytestmark = pytest.mark.integration

IDENTITY = "/v1/models/identity_fp32/infer"
SLEEP = "/v1/models/sleep_fp32/infer"


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(snap: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return snap.get((name, frozenset(labels.items())), 0.0)


def rows(n: int = 2) -> list[list[float]]:
    return [unique_row() for _ in range(n)]


def test_metrics_after_real_traffic(client: httpx.Client) -> None:
    before = samples(client.get("/metrics").text)
    body = {"inputs": {"INPUT0": rows()}}
    assert client.post(IDENTITY, json=body).headers["x-cache"] == "MISS"
    assert client.post(IDENTITY, json=body).headers["x-cache"] == "HIT"
    r = client.post(IDENTITY, json={"inputs": {"INPUT0": rows()}}, headers={"Cache-Control": "no-cache"})
    assert r.headers["x-cache"] == "BYPASS"
    assert client.post("/v1/models/no_such_model/infer", json=body).status_code == 404
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    after = samples(r.text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    handler = {"handler": "/v1/models/{model}/infer", "method": "POST"}
    assert delta("http_requests_total", **handler, status="200") == 3
    assert delta("http_requests_total", **handler, status="404") == 1
    assert delta("http_request_duration_seconds_count", **handler) == 4
    assert delta("tgw_cache_requests_total", outcome="miss") == 1
    assert delta("tgw_cache_requests_total", outcome="hit") == 1
    assert delta("tgw_cache_requests_total", outcome="bypass") == 1
    assert delta("tgw_cache_operation_duration_seconds_count", operation="get") == 2
    assert delta("tgw_cache_operation_duration_seconds_count", operation="put") == 2  # no-cache still stores
    triton = {"model": "identity_fp32", "version": "1", "outcome": "ok"}
    assert delta("tgw_triton_request_duration_seconds_count", **triton) == 2
    assert delta("tgw_triton_request_duration_seconds_bucket", **triton, le="+Inf") == 2
    assert delta("tgw_request_size_bytes_count") >= 5  # the first scrape counts too
    assert delta("tgw_response_size_bytes_sum") > 0
    assert value(after, "tgw_inflight_requests") >= 1  # this scrape
    assert ("tgw_singleflight_waiters", frozenset()) in after
    assert ("tgw_singleflight_shared_total", frozenset()) in after


def test_one_access_log_line_per_request(client: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="app.access")
    secret_value = 4242.125
    body = {"inputs": {"INPUT0": [[secret_value, 1.0]]}}
    r = client.post(IDENTITY, json=body, headers={"X-Request-ID": "ops-log-1", "Cache-Control": "no-store"})
    assert r.status_code == 200
    records = eventually(
        lambda: [rec for rec in caplog.records if getattr(rec, "request_id", None) == "ops-log-1"], 10, 0.02,
        "the access log line",
    )  # fmt: skip
    assert len(records) == 1
    line = JsonFormatter().format(records[0])
    out = orjson.loads(line)
    assert out["logger"] == "app.access" and out["msg"] == "request" and out["level"] == "INFO"
    assert out["method"] == "POST" and out["path"] == IDENTITY and out["status"] == 200
    assert out["model"] == "identity_fp32" and out["version"] == "1" and out["cache"] in ("MISS", "HIT")
    assert isinstance(out["duration_ms"], float) and out["duration_ms"] > 0
    assert "4242" not in line  # no payloads in logs


# --- real `tgw serve` processes ------------------------------------------------------------------------


def serve(triton: EmbeddedTriton, redis: EmbeddedRedis, tmp: Path, **env: str) -> TgwProcess:
    """A real ``tgw serve`` (inference over gRPC) from a clean environment, its temporary files in ``tmp``."""
    return tgw_serve(triton, redis.url, tmp / "gateway.log", base=clean_env(), TMPDIR=str(tmp), **env)


def _log_time(text: str, message_start: str) -> float:
    for line in text.splitlines():
        if line.startswith("{"):
            entry = orjson.loads(line)
            if entry["msg"].startswith(message_start):
                ts = datetime.strptime(entry["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
                return ts.timestamp()
    raise AssertionError(f"no log line {message_start!r} in:\n{text}")


@dataclass
class LoadResult:
    ok: list[float] = field(default_factory=list)  # completion times
    failed: list[str] = field(default_factory=list)  # accepted but not answered 200
    refused: list[float] = field(default_factory=list)  # connection refused: never accepted


async def _client_loop(url: str, n: int, result: LoadResult, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as c:
        i = 0
        while not stop.is_set():
            i += 1
            if (n + i) % 2:  # a Triton call of 0.3 s, never from the cache
                path, body, headers = (
                    SLEEP,
                    {"inputs": {"DELAY_S": [[0.3]]}},
                    {"Cache-Control": "no-cache, no-store"},
                )
            else:
                path, body, headers = IDENTITY, {"inputs": {"INPUT0": rows(1)}}, {}
            try:
                r = await c.post(path, json=body, headers=headers)
            except httpx.ConnectError:
                result.refused.append(time.time())
                return
            except httpx.HTTPError as exc:
                result.failed.append(f"{path}: {exc!r}")
                return
            if r.status_code == 200:
                result.ok.append(time.time())
            else:
                result.failed.append(f"{path}: {r.status_code} {r.text[:200]}")


async def _readiness_loop(url: str, seen: list[tuple[float, float, int]], stop: asyncio.Event) -> None:
    """(sent, answered, status) of each probe."""
    async with httpx.AsyncClient(base_url=url, timeout=5) as c:
        while not stop.is_set():
            sent = time.time()
            try:
                r = await c.get("/readyz")
            except httpx.HTTPError:
                return
            seen.append((sent, time.time(), r.status_code))
            await asyncio.sleep(0.1)  # pacing: a probe every 0.1 s


def test_sigterm_drains_under_load_without_failed_requests(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    delay_s = 2.0
    with serve(triton, redis_server, tmp_path, TGW_SHUTDOWN_DELAY_S=str(delay_s), TGW_DRAIN_S="20") as tgw:
        proc, url, log = tgw.proc, tgw.url, tgw.log
        result, ready = LoadResult(), []
        long_sent = 0.0

        async def scenario() -> float:
            nonlocal long_sent
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_client_loop(url, n, result, stop)) for n in range(8)]
            tasks.append(asyncio.create_task(_readiness_loop(url, ready, stop)))
            # built before the signal (an AsyncClient loads the CA bundle): nothing slow between the
            # timed sleep and the request
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                await asyncio.sleep(1.2)  # load phase before the signal
                sent = time.time()
                proc.send_signal(signal.SIGTERM)
                # a long request accepted during the delay, still running when the listener closes; sent
                # well before the close (1.5 s): a client process stalled for a moment must not send it late
                await asyncio.sleep(delay_s - 1.5)  # timed: into the shutdown delay
                body, headers = {"inputs": {"DELAY_S": [[2.0]]}}, {"Cache-Control": "no-cache, no-store"}
                long_sent = time.time()
                try:
                    long = await c.post(SLEEP, json=body, headers=headers)
                except httpx.HTTPError as exc:
                    pytest.fail(f"long request sent {long_sent - sent:.2f} s after the signal: {exc!r}")
            assert long.status_code == 200, long.text
            result.ok.append(time.time())
            try:
                await asyncio.wait_for(asyncio.gather(*tasks), timeout=delay_s + 15)
            finally:
                stop.set()
            return sent

        signalled = asyncio.run(scenario())
        code = proc.wait(timeout=30)
        text = log.read_text()
    assert code == 0, text
    assert result.failed == [], result.failed
    assert len(result.refused) == 8  # every client loop ends with a refused connection
    closed = _log_time(text, "shutdown delay over")
    timeline = (f"ok after signal: {[round(t - signalled, 2) for t in result.ok if t > signalled]}, "
                f"closed: {closed - signalled:.2f}, refused: {[round(t - signalled, 2) for t in result.refused]}, "
                f"long request sent: {long_sent - signalled:.2f}")  # fmt: skip
    assert closed - signalled == pytest.approx(delay_s, abs=0.3), timeline
    assert min(result.refused) > closed, timeline
    # Requests kept being accepted and answered during the delay, and in-flight ones finished after close.
    assert sum(signalled < t < closed for t in result.ok) >= 8, timeline
    assert sum(t > closed for t in result.ok) >= 1, timeline
    # Readiness: 200 before the signal, 503 from (almost) at once after it. A probe answered before the
    # signal was sent, and one sent 0.15 s after it (times of the client's own, so a client late in reading
    # an answer cannot blur them).
    assert all(status == 200 for _, received, status in ready if received < signalled)
    after = [status for probe_sent, _, status in ready if probe_sent > signalled + 0.15]
    assert after and set(after) == {503}
    assert "SIGTERM received: draining" in text
    print(f"\nSIGTERM test: {len(result.ok)} ok, {sum(t > signalled for t in result.ok)} answered after the "
          f"signal, {sum(t > closed for t in result.ok)} after the listener closed "
          f"({closed - signalled:.2f} s after the signal), 0 failed, {len(result.refused)} refused, "
          f"readiness {dict(Counter(s for _, _, s in ready))}; {text.count('queued connection')} accept queue "
          "drained at the close")  # fmt: skip


def test_two_workers_share_metrics_and_exit_cleanly(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    with serve(triton, redis_server, tmp_path, TGW_WORKERS="2", TGW_SHUTDOWN_DELAY_S="0.2") as tgw:
        proc, url, log = tgw.proc, tgw.url, tgw.log
        assert len(list(tmp_path.glob("tgw-prometheus-*"))) == 1

        async def traffic() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                # fresh connections spread the requests over both workers
                reqs = [c.post(IDENTITY, json={"inputs": {"INPUT0": rows(1)}}, headers={"Connection": "close"})
                        for _ in range(20)]  # fmt: skip
                return [r.status_code for r in await asyncio.gather(*reqs)]

        assert asyncio.run(traffic()) == [200] * 20
        for _ in range(6):  # every scrape, whichever worker answers, sees all the traffic
            r = httpx.get(f"{url}/metrics", headers={"Connection": "close"})
            snap = samples(r.text)
            handler = {"handler": "/v1/models/{model}/infer", "method": "POST", "status": "200"}
            assert value(snap, "http_requests_total", **handler) == 20
            triton_ok = {"model": "identity_fp32", "version": "1", "outcome": "ok"}
            assert value(snap, "tgw_triton_request_duration_seconds_count", **triton_ok) == 20
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        text = log.read_text()
    assert code == 0, text
    assert list(tmp_path.glob("tgw-prometheus-*")) == []
