"""Every HTTP route goes through the one request pipeline (``app.frontends.http.pipeline``): the infer routes (answered by
its raw-ASGI router) and the FastAPI routes get the same request id, body limit, metrics, span and
drain handling from the same code; infer answers carry ``Server-Timing``."""

from __future__ import annotations

import httpx
import pytest

from app.observability import tracing
from tests.integration.conftest import GatewayFactory
from tests.integration.test_operations import samples, value

pytestmark = pytest.mark.integration

NO_CACHE = {"Cache-Control": "no-cache, no-store"}
V2_BINARY = {
    "inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}],
    "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}],
}


def test_every_route_counted_by_template(client: httpx.Client) -> None:
    body = {"inputs": {"INPUT0": [[1.0, 2.0]]}}
    before = samples(client.get("/metrics").text)
    got = [
        client.post("/v1/models/identity_fp32/infer", json=body, headers=NO_CACHE),
        client.post("/v1/models/identity_fp32/versions/1/infer", json=body, headers=NO_CACHE),
        client.post("/v2/models/identity_fp32/infer", json=V2_BINARY, headers=NO_CACHE),
        client.post("/v2/models/nope/infer", json={"inputs": []}),
        client.post("/v1/models/identity_fp32/infer", json={"inputs": {"NOPE": [[1.0]]}}),
        client.get("/v1/models/identity_fp32"),
        client.get("/v2/models/identity_fp32"),
        client.get("/v1/models/nope"),
    ]
    after = samples(client.get("/metrics").text)
    assert [r.status_code for r in got] == [200, 200, 200, 404, 422, 200, 200, 404]
    assert all(len(r.headers["x-request-id"]) == 32 for r in got)

    def delta(handler: str, method: str, status: str) -> float:
        labels = {"handler": handler, "method": method, "status": status}
        return value(after, "http_requests_total", **labels) - value(before, "http_requests_total", **labels)

    assert delta("/v1/models/{model}/infer", "POST", "200") == 1
    assert delta("/v1/models/{model}/infer", "POST", "422") == 1
    assert delta("/v1/models/{model}/versions/{version}/infer", "POST", "200") == 1
    assert delta("/v2/models/{model}/infer", "POST", "200") == 1
    assert delta("/v2/models/{model}/infer", "POST", "404") == 1
    assert delta("/v1/models/{model}", "GET", "200") == 1
    assert delta("/v1/models/{model}", "GET", "404") == 1
    assert delta("/v2/models/{model}", "GET", "200") == 1
    binary = got[2]
    assert binary.headers["content-type"] == "application/octet-stream"
    assert binary.headers["inference-header-content-length"] is not None
    # Server-Timing on infer answers, and a stage histogram that counted them.
    stages = dict(part.strip().split(";dur=") for part in got[0].headers["server-timing"].split(","))
    assert {"triton", "total"} <= set(stages) and float(stages["total"]) >= float(stages["triton"]) > 0
    assert "server-timing" not in got[5].headers
    count = "tgw_stage_duration_seconds_count"
    assert value(after, count, stage="triton") - value(before, count, stage="triton") >= 3
    assert value(after, count, stage="total") - value(before, count, stage="total") == 5


def test_body_limit_is_one_rule_for_every_route(start_gateway: GatewayFactory) -> None:
    with start_gateway(max_body_bytes=1024) as url, httpx.Client(base_url=url, timeout=30) as c:
        big = b"x" * 4096
        for path in ("/v1/models/identity_fp32/infer", "/v1/models/identity_fp32/jobs"):
            r = c.post(path, content=big, headers={"content-type": "application/json"})
            assert r.status_code == 413, path
            assert r.json()["error"]["details"]["limit_bytes"] == 1024
            assert r.headers["x-request-id"]

            def chunks() -> object:
                for _ in range(8):
                    yield b"y" * 512

            r = c.post(path, content=chunks(), headers={"content-type": "application/json"})  # streamed
            assert r.status_code == 413, path


def test_server_timing_can_be_turned_off(start_gateway: GatewayFactory) -> None:
    with start_gateway(server_timing=False) as url:
        r = httpx.post(
            f"{url}/v1/models/identity_fp32/infer", json={"inputs": {"INPUT0": [[1.0]]}}, timeout=30
        )
        assert r.status_code == 200 and "server-timing" not in r.headers


def test_request_id_echoed_or_generated(client: httpx.Client) -> None:
    body = {"inputs": {"INPUT0": [[3.0]]}}
    r = client.post("/v1/models/identity_fp32/infer", json=body, headers={"X-Request-ID": "hot-1"})
    assert r.headers["x-request-id"] == "hot-1"
    assert client.get("/v1/models", headers={"X-Request-ID": "cold-1"}).headers["x-request-id"] == "cold-1"
    ids = {client.post("/v1/models/identity_fp32/infer", json=body).headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)
    bad = client.post("/v1/models/identity_fp32/infer", json=body, headers={"X-Request-ID": "bad id;x"})
    assert bad.headers["x-request-id"] != "bad id;x" and len(bad.headers["x-request-id"]) == 32


def test_server_span_on_infer_and_other_routes(start_gateway: GatewayFactory) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    tracing.setup_tracing(None, exporter=exporter)
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    try:
        with start_gateway() as url:
            r = httpx.post(
                f"{url}/v1/models/identity_fp32/infer", json={"inputs": {"INPUT0": [[7.0, 8.0]]}},
                headers={"traceparent": parent, "X-Request-ID": "span-1", **NO_CACHE}, timeout=30,
            )  # fmt: skip
            assert r.status_code == 200
            assert httpx.get(f"{url}/v1/models/identity_fp32", timeout=30).status_code == 200
    finally:
        tracing.shutdown_tracing()
    spans = exporter.get_finished_spans()
    server = [s for s in spans if s.name == "POST /v1/models/{model}/infer"]
    assert len(server) == 1, [s.name for s in spans]
    attrs = server[0].attributes or {}
    assert attrs["http.route"] == "/v1/models/{model}/infer"
    assert attrs["http.response.status_code"] == 200 and attrs["tgw.request_id"] == "span-1"
    assert f"{server[0].context.trace_id:032x}" == "0af7651916cd43dd8448eb211c80319c"
    triton = [s for s in spans if s.name == "triton.infer"]
    assert triton and triton[0].parent is not None and triton[0].parent.span_id == server[0].context.span_id
    assert any(s.name == "GET /v1/models/{model}" for s in spans)
