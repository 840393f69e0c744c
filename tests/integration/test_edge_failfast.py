"""Issue 19 item 11 against real Tritons: when every endpoint is frozen (SIGSTOP) the gateway answers 503
with Retry-After within a bounded wait instead of holding every request for the length of the freeze, and
serves again once they resume: with two Tritons (``TGW_TRITON_URLS``) and with one (``TGW_TRITON_URL``,
over gRPC, and over HTTP with ``TGW_TRITON_HTTP_URL``)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.launcher import EmbeddedRedis, EmbeddedTriton
from tests.eventually import eventually
from tests.gateway_server import running_gateway
from tests.integration.servers import running_tritons

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MODELS = Path(__file__).resolve().parents[1] / "models"
FREEZE_S = 8.0


@pytest.fixture(scope="module")
def two_tritons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[EmbeddedTriton]]:
    with running_tritons(tmp_path_factory, ["identity_fp32"], count=2) as servers:
        yield servers


@dataclass
class Outcome:
    started: float
    seconds: float
    status: int
    retry_after: str | None


def _infer(url: str, x: float) -> Outcome:
    body = {"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [x, 2.0]}]}
    start = time.monotonic()
    try:
        r = httpx.post(f"{url}/v2/models/identity_fp32/infer", json=body, timeout=60)
        status, retry = r.status_code, r.headers.get("retry-after")
    except httpx.HTTPError:
        status, retry = 0, None
    return Outcome(start, time.monotonic() - start, status, retry)


def test_every_triton_frozen_is_a_quick_503_then_serving_again(
    two_tritons: list[EmbeddedTriton], redis_server: EmbeddedRedis
) -> None:
    urls = ",".join(f"grpc={t.grpc_url};http={t.http_url.removeprefix('http://')}" for t in two_tritons)
    with running_gateway(triton_urls=urls, redis_url=redis_server.url, triton_timeout_s=30.0) as url:
        _freeze_and_check(url, two_tritons)


@pytest.mark.parametrize("over", ["grpc", "http"])
def test_the_one_triton_frozen_is_a_quick_503_then_serving_again(
    two_tritons: list[EmbeddedTriton], redis_server: EmbeddedRedis, over: str
) -> None:
    """One Triton (TGW_TRITON_URL): it waited out the whole freeze before (no probe loop)."""
    one = two_tritons[0]
    http = {"triton_http_url": one.http_url} if over == "http" else {}
    with running_gateway(triton_url=one.grpc_url, redis_url=redis_server.url, triton_timeout_s=30.0,
                         **http) as url:  # fmt: skip
        _freeze_and_check(url, [one])


def _freeze_and_check(url: str, tritons: list[EmbeddedTriton]) -> None:
    seed = time.time_ns() % 1_000_000  # distinct inputs: no cached answers
    assert all(_infer(url, seed + i).status == 200 for i in range(4))
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:  # ~8 requests a second in all, each waiting for its answer
        i = 0
        while not stop.is_set():
            outcome = _infer(url, seed + 1000 * (k + 1) + i)
            with lock:
                outcomes.append(outcome)
            i += 1
            time.sleep(0.5)  # pacing: two requests a second per client

    pids = [t.process.pid for t in tritons]
    assert all(pids)
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # load before the freeze
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # type: ignore[arg-type]
    stopped = time.monotonic()
    try:
        time.sleep(FREEZE_S)  # the freeze's length
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)  # type: ignore[arg-type]
    resumed = time.monotonic()
    stop.set()
    for thread in threads:
        thread.join(timeout=60)
    during = [o for o in outcomes if stopped <= o.started < resumed - 0.5]
    # nothing waits out the freeze: the probes (1 s apart, 1 s timeout) bound every wait
    worst = max(o.seconds for o in during)
    assert worst < 6.0, sorted(round(o.seconds, 2) for o in during)
    late = [o for o in during if o.started >= stopped + 5.0]  # long since detected
    assert late and all(o.status == 503 and o.retry_after for o in late), late
    assert all(o.seconds < 2.0 for o in late), [round(o.seconds, 2) for o in late]
    assert {o.status for o in during} <= {200, 503}, {o.status for o in during}
    # back: the probes see them answer again and requests succeed
    eventually(lambda: _infer(url, seed + 99_999).status == 200, 30, 0.25,
               "the gateway did not serve again after the Tritons resumed")  # fmt: skip
