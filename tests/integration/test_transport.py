"""Inference over Triton's HTTP endpoint (``app.clients.triton_http``, the ``tgw up`` default) and over
gRPC (``TGW_TRITON_HTTP_URL`` unset) give the same answers and the same errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from app.launcher import EmbeddedTriton, free_port
from tests.integration.conftest import GatewayFactory

pytestmark = pytest.mark.integration

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
TRANSPORTS = ("http", "grpc")


@pytest.fixture(params=TRANSPORTS)
def gateway(
    request: pytest.FixtureRequest, start_gateway: GatewayFactory, triton: EmbeddedTriton
) -> Iterator[str]:
    http_url = triton.http_url if request.param == "http" else None
    with start_gateway(triton_http_url=http_url, triton_timeout_s=0.5) as url:
        yield url


def _calls(c: httpx.Client) -> list[tuple[int, object]]:
    out: list[tuple[int, object]] = []

    def add(r: httpx.Response) -> None:
        body = r.json()
        if r.status_code >= 400:
            body = {"code": body["error"]["code"]}  # messages differ in wording between transports
        out.append((r.status_code, body))

    add(c.post("/v1/models/identity_fp32/infer", json={"inputs": {"INPUT0": [[1.5, -2.0], [3.0, 4.25]]}},
               headers=NO_CACHE))  # fmt: skip
    add(c.post("/v1/models/versioned_fp32/versions/2/infer", json={"inputs": {"INPUT0": [[1.0, 2.0]]}},
               headers=NO_CACHE))  # fmt: skip
    add(c.post("/v1/models/typed/infer", headers=NO_CACHE, json={"inputs": {
        "I8": [1, 2], "FLAG": [True], "TEXT": ["ab", "cd"], "F16": [0.5, 0.25]}}))  # fmt: skip
    add(c.post("/v1/models/typed/infer", headers=NO_CACHE, json={"inputs": {
        "I8": [1, 2], "FLAG": [True], "TEXT": ["ab", "cd"], "F16": [0.5, 0.25]}, "outputs": ["TEXT_OUT"]}))  # fmt: skip
    add(c.post("/v1/models/reject_fp32/infer", json={"inputs": {"INPUT0": [[-1.0]]}}, headers=NO_CACHE))
    add(c.post("/v1/models/sleep_fp32/infer", json={"inputs": {"DELAY_S": [[2.0]]}}, headers=NO_CACHE))
    return out


@pytest.fixture(scope="module")
def reference(triton: EmbeddedTriton, redis_server: object) -> list[tuple[int, object]]:
    from tests.gateway_server import running_gateway

    url_kwargs = {"triton_url": triton.grpc_url, "redis_url": redis_server.url}  # type: ignore[attr-defined]
    with (
        running_gateway(**url_kwargs, triton_timeout_s=0.5) as url,
        httpx.Client(base_url=url, timeout=30) as c,
    ):
        return _calls(c)


def test_same_answers_and_errors(gateway: str, reference: list[tuple[int, object]]) -> None:
    with httpx.Client(base_url=gateway, timeout=30) as c:
        got = _calls(c)
    assert got == reference
    statuses = [s for s, _ in got]
    assert statuses == [200, 200, 200, 200, 502, 504]
    typed = got[2][1]
    assert typed["outputs"]["TEXT_OUT"] == ["AB", "CD"] and typed["outputs"]["SUM"] == [4.75]  # type: ignore[index]
    assert list(got[3][1]["outputs"]) == ["TEXT_OUT"]  # type: ignore[index]


def test_rejection_message_and_quick_deadline(gateway: str) -> None:
    with httpx.Client(base_url=gateway, timeout=30) as c:
        r = c.post("/v1/models/reject_fp32/infer", json={"inputs": {"INPUT0": [[-1.0]]}}, headers=NO_CACHE)
        assert r.status_code == 502 and "negative values refused" in r.json()["error"]["message"]
        t0 = time.monotonic()
        r = c.post("/v1/models/sleep_fp32/infer", json={"inputs": {"DELAY_S": [[3.0]]}}, headers=NO_CACHE)
        assert r.status_code == 504 and time.monotonic() - t0 < 2.0
        # the connection cut at the deadline is not reused: the next call is answered normally
        r = c.post("/v1/models/identity_fp32/infer", json={"inputs": {"INPUT0": [[9.0]]}}, headers=NO_CACHE)
        assert r.status_code == 200 and r.json()["outputs"]["OUTPUT0"] == [[9.0]]


def test_concurrent_calls_share_a_bounded_pool(gateway: str) -> None:
    bodies = [{"inputs": {"INPUT0": [[float(i), float(-i)]]}} for i in range(200)]

    async def fire() -> list[httpx.Response]:
        async with httpx.AsyncClient(
            base_url=gateway, timeout=30, limits=httpx.Limits(max_connections=100)
        ) as ac:
            return await asyncio.gather(*(
                ac.post("/v1/models/identity_fp32/infer", json=b, headers=NO_CACHE) for b in bodies
            ))  # fmt: skip

    for body, r in zip(bodies, asyncio.run(fire()), strict=True):
        assert r.status_code == 200, r.text
        assert r.json()["outputs"]["OUTPUT0"] == body["inputs"]["INPUT0"]


def test_triton_http_unreachable_is_503_with_retry_after(start_gateway: GatewayFactory) -> None:
    with start_gateway(triton_http_url=f"127.0.0.1:{free_port()}", retry_after_s=3) as url:
        r = httpx.post(f"{url}/v1/models/identity_fp32/infer", json={"inputs": {"INPUT0": [[1.0]]}},
                       headers=NO_CACHE, timeout=20)  # fmt: skip
        ready = httpx.get(f"{url}/readyz", timeout=20)
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "3" and r.json()["error"]["code"] == "triton_unavailable"
    assert ready.status_code == 503 and ready.json()["checks"]["triton"]["status"] == "fail"
