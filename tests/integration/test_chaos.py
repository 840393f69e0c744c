"""The chaos suite: a ``tgw up`` stack with two embedded Tritons (TGW_EMBEDDED_TRITONS=2) under client load
while its parts are killed, stopped and restarted. Each phase is bounded in time and in requests, loopback
only, and reports requests sent, failed, and jobs lost or duplicated (printed at the end of the run and
written to chaos-results/report.json).

``make test`` runs the short phases; ``make chaos`` runs them longer (TGW_CHAOS_SCALE=4).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from app.launcher import free_port, free_port_block
from app.services.jobs.store import STREAM
from tests.chaos.load import Load
from tests.eventually import eventually
from tests.integration.jobs_helpers import reading_workers, sigkill_worker_holding_jobs, wait_job
from tests.processes import ROOT, TgwProcess, start_tgw, up_env

pytestmark = pytest.mark.integration
SCALE = float(os.environ.get("TGW_CHAOS_SCALE", "1"))
DEADLINE_S = 3.0  # TGW_TRITON_TIMEOUT_S of the stack: no request may wait longer (plus slack)
REPORT: dict[str, dict[str, Any]] = {}


def endpoints(stack: TgwProcess) -> dict[str, dict[str, Any]]:
    ready = httpx.get(f"{stack.url}/readyz", timeout=5).json()
    return dict(ready["checks"]["triton"].get("endpoints", {}))


def metric(stack: TgwProcess, name: str, labels: str) -> float:
    text = httpx.get(f"{stack.url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}}"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait(check: Callable[[], object], timeout: float, what: str) -> None:
    """``eventually``; a probe that fails meanwhile (the stack is restarting) is tried again."""
    eventually(check, timeout, 0.25, what, ignoring=(httpx.HTTPError, KeyError, ValueError))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[TgwProcess]:
    tmp = tmp_path_factory.mktemp("chaos")
    base = free_port_block(6)
    env = up_env(
        tmp / "state", TGW_EMBEDDED_TRITONS="2", TGW_TRITON_HTTP_PORT=str(base), TGW_TRITON_GRPC_PORT=str(base + 1),
        TGW_TRITON_METRICS_PORT=str(base + 2), TGW_SHUTDOWN_DELAY_S="0", TGW_DRAIN_S="2",
        TGW_TRITON_TIMEOUT_S=str(DEADLINE_S), TGW_JOB_CLAIM_IDLE_S="2",
        TGW_LOG_LEVEL=os.environ.get("TGW_CHAOS_LOG_LEVEL", "WARNING"), TGW_LOG_FORMAT="text",
    )  # fmt: skip
    with start_tgw(["up"], env, tmp / "tgw-up.log", timeout=150, graceful_stop=True) as stack:

        def both_healthy() -> bool:
            if stack.proc.poll() is not None:
                pytest.fail(f"tgw up exited:\n{stack.log_tail()}")
            return all(e["state"] == "healthy" for e in endpoints(stack).values())

        try:
            _wait(both_healthy, 150, "both Tritons healthy")
        except AssertionError as exc:
            pytest.fail(f"tgw up with 2 Tritons did not become ready ({exc}):\n{stack.log_tail()}")
        yield stack
    _report(request)


def _report(request: pytest.FixtureRequest) -> None:
    out = ROOT / "chaos-results"
    out.mkdir(exist_ok=True)
    (out / "report.json").write_text(json.dumps(REPORT, indent=2) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(f"chaos phases (scale {SCALE:g}; chaos-results/report.json):")
        for phase, figures in REPORT.items():
            reporter.write_line(f"  {phase}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def _triton_endpoint(stack: TgwProcess, i: int) -> str:
    return f"127.0.0.1:{int(stack.env['TGW_TRITON_GRPC_PORT']) + 3 * i}"


def test_sigkill_one_of_two_tritons_under_load(stack: TgwProcess) -> None:
    """Target: 0 failed requests; the killed Triton restarted by `tgw up` and back in rotation < 30 s."""
    name = _triton_endpoint(stack, 0)
    with Load([stack.url], concurrency=4) as load:
        time.sleep(2 * SCALE)  # load phase before the kill
        os.kill(stack.child("state/triton-0/"), signal.SIGKILL)
        killed_at = time.monotonic()
        _wait(lambda: endpoints(stack)[name]["state"] == "ejected", 10, "ejection")
        _wait(lambda: endpoints(stack)[name]["state"] != "ejected", 60, "the Triton back")
        back_s = time.monotonic() - killed_at
        time.sleep(2 * SCALE)  # load phase: and it serves again
    REPORT["triton_sigkill"] = {**load.summary(), "back_after_s": round(back_s, 1)}
    assert load.sent > 50
    assert load.failed == [], load.failed[:5]
    assert back_s < 30
    assert metric(stack, "tgw_triton_endpoint_calls_total", f'endpoint="{name}",outcome="ok"') > 0


def test_sigstop_one_triton_for_5s(stack: TgwProcess) -> None:
    """Requests move away from a frozen Triton; none waits past its deadline (TGW_TRITON_TIMEOUT_S)."""
    frozen = _triton_endpoint(stack, 1)
    before = metric(stack, "tgw_triton_endpoint_calls_total", f'endpoint="{frozen}",outcome="ok"')
    with Load([stack.url], concurrency=4) as load:
        time.sleep(1 * SCALE)  # load phase before the freeze
        pid = stack.child("state/triton-1/")
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        try:
            time.sleep(5)  # the freeze's length
        finally:
            os.kill(pid, signal.SIGCONT)
        time.sleep(2 * SCALE)  # load phase after it
    during = [o for o in load.outcomes if stopped_at + 1.5 <= o.started < stopped_at + 5]
    slow = [o for o in during if o.seconds > 1.0]
    REPORT["triton_sigstop_5s"] = {**load.summary(), "sent_while_stopped": len(during), "slow_while_stopped":
                                   len(slow), "deadline_s": DEADLINE_S}  # fmt: skip
    assert max(o.seconds for o in load.outcomes) <= DEADLINE_S + 1.0
    assert len(during) > 20 and len(slow) <= 4  # once ejected (probe timeout 1 s), traffic went elsewhere
    # 504: at the deadline; 503: a call on the frozen Triton once it missed 2 probes (issue 19 item 11)
    assert all(o.status in (200, 503, 504) for o in load.failed), load.failed[:5]
    after = metric(stack, "tgw_triton_endpoint_calls_total", f'endpoint="{frozen}",outcome="ok"')
    assert after >= before


def _sleep_jobs(c: httpx.Client, n: int, delay_s: float) -> tuple[list[str], list[float]]:
    base = delay_s + (time.time_ns() % 1000) / 1e6  # distinct inputs: no cached answers
    delays = [round(base + i / 1000, 6) for i in range(n)]
    ids = [
        c.post("/v1/models/sleep_fp32/jobs", json={"inputs": {"DELAY_S": [[d]]}}).json()["id"] for d in delays
    ]
    return ids, delays


def _check_jobs(jobs: list[dict[str, Any]], delays: list[float]) -> tuple[int, int]:
    lost = sum(1 for j in jobs if j["status"] != "succeeded")
    wrong = sum(1 for j, d in zip(jobs, delays, strict=True) if j["status"] == "succeeded"
                and abs(j["result"]["outputs"]["SLEPT_S"][0][0] - d) > 1e-4)  # fmt: skip
    return lost, wrong


def test_redis_sigkill_then_restart_under_load(stack: TgwProcess) -> None:
    """Both Redis instances of `tgw up` (the cache's and the jobs') SIGKILLed under load and restarted by
    `tgw up`. Sync path: 0 failed (cache bypass meanwhile). Jobs accepted before the kill, some running and
    some queued at that moment, all complete, none twice (the store's completion count, moved by the same
    script that completes a job, moves by exactly the number of jobs; the process's Prometheus counter
    can miss a completion whose reply was lost with the connection)."""
    cache_port, jobs_port = stack.env["TGW_REDIS_PORT"], stack.env["TGW_JOBS_REDIS_PORT"]
    with httpx.Client(base_url=stack.url, timeout=10) as c:
        done_before = c.get("/v1/jobs/stats").json()["jobs_total"].get("succeeded", 0)
        ids, delays = _sleep_jobs(c, int(12 * SCALE), 0.3)
        with Load([stack.url], concurrency=4) as load:
            time.sleep(float(os.environ.get("TGW_CHAOS_REDIS_KILL_AT_S", "0.3")))  # when the kill lands
            unfinished = sum(c.get(f"/v1/jobs/{i}").json()["status"] != "succeeded" for i in ids)
            for port in (cache_port, jobs_port):
                os.kill(stack.child(f"127.0.0.1:{port}"), signal.SIGKILL)
            killed_at = time.monotonic()
            _wait(lambda: all(stack.find(f"127.0.0.1:{p}") is not None for p in (cache_port, jobs_port)) and
                  httpx.get(f"{stack.url}/readyz", timeout=2).json()["checks"]["redis"]["status"] == "ok",
                  30, "Redis back")  # fmt: skip
            back_s = time.monotonic() - killed_at
            time.sleep(1 * SCALE)  # load phase on the restarted Redis
        try:
            jobs = [wait_job(c, i, timeout=40) for i in ids]
        except AssertionError as exc:  # what the job streams hold, for the report
            r = redis.Redis.from_url(_jobs_redis_url(stack.env))
            streams = {k: r.xpending_range(k, "tgw-workers", "-", "+", 100)
                       for k in ("{tgw:jobs}:stream", "{tgw:jobs}:stream:high") if r.exists(k)}  # fmt: skip
            raise AssertionError(f"{exc}; pending entries: {streams}") from None
        time.sleep(1.0)  # a real wait: a duplicate completion, were there one, has a second to land
        done = c.get("/v1/jobs/stats").json()["jobs_total"].get("succeeded", 0) - done_before
    lost, wrong = _check_jobs(jobs, delays)
    REPORT["redis_sigkill_restart"] = {**load.summary(), "redis_back_after_s": round(back_s, 1),
                                       "jobs": len(ids), "jobs_unfinished_at_kill": unfinished,
                                       "jobs_lost": lost, "jobs_wrong": wrong,
                                       "jobs_duplicated": int(done) - len(ids)}  # fmt: skip
    assert load.failed == [], load.failed[:5]
    assert unfinished > 0
    assert lost == 0 and wrong == 0
    assert done == len(ids)


def test_sigkill_a_job_worker_mid_batch(stack: TgwProcess, tmp_path: Path) -> None:
    """Two `tgw worker` processes beside the stack's own; one is SIGKILLed while it holds running jobs:
    every job completes, and each result reaches the client (WebSocket) exactly once."""
    from tests.integration.test_jobs_durability import collect_results

    env = dict(stack.env)
    env.update(TGW_TRITON_URLS=_triton_urls(env), TGW_REDIS_URL=_redis_url(env),
               TGW_JOBS_REDIS_URL=_jobs_redis_url(env), TGW_WORKER_CONCURRENCY="3",
               TGW_JOB_CLAIM_IDLE_S="1", TGW_DRAIN_S="2")  # fmt: skip
    workers = []
    for i in range(2):
        with (tmp_path / f"worker{i}.log").open("wb") as out:
            workers.append(subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], env=env, cwd=ROOT,
                                            stdout=out, stderr=out))  # fmt: skip
    frames: list[dict[str, Any]] = []
    stop = threading.Event()
    try:
        # The job streams' Redis: TGW_JOBS_REDIS_URL's, or the cache's where the jobs runtime does not
        # read that setting yet.
        clients = [redis.Redis.from_url(u) for u in (_jobs_redis_url(env), _redis_url(env))]
        pids = {w.pid for w in workers}
        eventually(lambda: any(reading_workers(x, workers) == pids for x in clients), 30, 0.1,
                   "the workers wait for jobs in the consumer group")  # fmt: skip
        with httpx.Client(base_url=stack.url, timeout=10) as c:
            ids, delays = _sleep_jobs(c, int(12 * SCALE), 0.8)
            r = next((x for x in clients if x.exists(STREAM)), clients[0])
            ws_url = stack.url.replace("http", "ws") + "/v1/ws"
            for chunk in (ids[i : i + 30] for i in range(0, len(ids), 30)):  # TGW_WS_MAX_IN_FLIGHT per socket
                threading.Thread(
                    target=collect_results, args=(ws_url, chunk, frames, stop), daemon=True
                ).start()
            sigkill_worker_holding_jobs(r, workers)
            jobs = [wait_job(c, i, timeout=40) for i in ids]
            # results of jobs finished before the subscription come from the socket's periodic re-read; a
            # result missing past 20 s is reported by the assertions below, after the phase's figures
            with contextlib.suppress(AssertionError):
                eventually(lambda: {f.get("job_id") for f in frames if f.get("type") == "result"} >= set(ids),
                           20, 0.2)  # fmt: skip
            time.sleep(1.0)  # a real wait: a duplicate, were there one, has a second to arrive
    finally:
        stop.set()
        for w in workers:
            if w.poll() is None:
                w.terminate()
                w.wait(10)
    lost, wrong = _check_jobs(jobs, delays)
    results = Counter(f["job_id"] for f in frames if f.get("type") == "result")
    duplicated = sum(n - 1 for n in results.values() if n > 1)
    REPORT["worker_sigkill"] = {"jobs": len(ids), "jobs_lost": lost, "jobs_wrong": wrong,
                                "results_seen": sum(results.values()), "jobs_duplicated": duplicated,
                                "reclaimed": sum(j["attempts"] >= 2 for j in jobs)}  # fmt: skip
    assert lost == 0 and wrong == 0
    assert results == Counter({i: 1 for i in ids})


def _triton_urls(env: dict[str, str]) -> str:
    grpc, http = int(env["TGW_TRITON_GRPC_PORT"]), int(env["TGW_TRITON_HTTP_PORT"])
    return ",".join(f"grpc=127.0.0.1:{grpc + 3 * i};http={http + 3 * i}" for i in range(2))


def _redis_url(env: dict[str, str]) -> str:
    return f"redis://127.0.0.1:{env['TGW_REDIS_PORT']}/0"


def _jobs_redis_url(env: dict[str, str]) -> str:
    return f"redis://127.0.0.1:{env['TGW_JOBS_REDIS_PORT']}/0"


def test_sigkill_one_of_two_gateways(stack: TgwProcess, tmp_path: Path) -> None:
    """A second gateway (`tgw serve`) on the same Tritons and Redis; SIGKILL it under load: only the
    requests in flight on it fail (the client stops sending there at once, as a load balancer would)."""
    env = dict(stack.env)
    # Its own gRPC port: tgw serve refuses one another stack listens on (SO_REUSEPORT would share it).
    env.update(
        {
            "TGW_PORT": str(free_port()),
            "TGW_GRPC_PORT": str(free_port()),
            "TGW_WORKER_IN_PROCESS": "false",
            "TGW_STARTUP_WAIT_S": "20",
        }
    )
    env["TGW_TRITON_URLS"] = _triton_urls(env)
    env["TGW_REDIS_URL"] = _redis_url(env)
    env["TGW_JOBS_REDIS_URL"] = _jobs_redis_url(env)
    concurrency = 4
    with start_tgw(["serve"], env, tmp_path / "gateway2.log", timeout=60) as second:
        url2 = second.url
        with Load([stack.url, url2], concurrency=concurrency) as load:
            time.sleep(2 * SCALE)  # load phase: requests on both gateways
            second.proc.send_signal(signal.SIGKILL)
            load.urls.remove(url2)
            killed_at = time.monotonic()
            time.sleep(2 * SCALE)  # load phase: the survivor alone
    failed = load.failed
    on_killed = [o for o in load.outcomes if o.gateway == url2]
    in_flight = [o for o in on_killed if o.started <= killed_at <= o.started + o.seconds]
    REPORT["gateway_sigkill"] = {**load.summary(), "served_by_killed": len(on_killed),
                                 "in_flight_at_kill": len(in_flight),
                                 "failed_on_killed": sum(o.gateway == url2 for o in failed)}  # fmt: skip
    assert len(on_killed) > 20
    assert all(o.gateway == url2 and o.started <= killed_at for o in failed), failed[:5]
    assert len(failed) <= concurrency
    assert sum(o.gateway == stack.url and o.started > killed_at for o in load.outcomes) > 20
