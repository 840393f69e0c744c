"""The hot path (``app.hotpath``) answers the infer routes exactly as the FastAPI routes do: same statuses,
bodies, headers, metrics labels and spans; ``TGW_FAST_PATH=false`` is the reference."""

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
_HEADERS = ("content-type", "content-length", "x-cache", "inference-header-content-length", "retry-after")


def _exchange(c: httpx.Client) -> list[httpx.Response]:
    body = {"inputs": {"INPUT0": [[1.0, 2.0]]}}
    v2_json = {"inputs": V2_BINARY["inputs"]}
    return [
        c.post("/v1/models/identity_fp32/infer", json=body, headers=NO_CACHE),
        c.post("/v1/models/identity_fp32/versions/1/infer", json=body, headers=NO_CACHE),
        c.post("/v2/models/identity_fp32/infer", json=v2_json, headers=NO_CACHE),
        c.post("/v2/models/identity_fp32/infer", json=V2_BINARY, headers=NO_CACHE),
        c.post("/v1/models/identity_fp32/infer", json={"inputs": {"NOPE": [[1.0]]}}),
        c.post("/v1/models/nope/infer", json=body),
        c.post("/v2/models/nope/infer", json={"inputs": []}),
        c.post("/v1/models/identity_fp32/infer", content=b"{not json"),
        c.post("/v1/models/identity_fp32/infer", content=b""),
    ]


def test_hot_path_and_routes_answer_alike(start_gateway: GatewayFactory) -> None:
    answers = []
    counts = []
    for fast in (True, False):
        with start_gateway(fast_path=fast) as url, httpx.Client(base_url=url, timeout=30) as c:
            before = samples(c.get("/metrics").text)
            got = _exchange(c)
            after = samples(c.get("/metrics").text)
        assert all(r.headers.get("x-request-id") for r in got)
        answers.append([(r.status_code, r.content, {h: r.headers.get(h) for h in _HEADERS}) for r in got])
        counts.append({
            (handler, status): value(after, "http_requests_total", handler=handler, method="POST", status=status)
            - value(before, "http_requests_total", handler=handler, method="POST", status=status)
            for handler in ("/v1/models/{model}/infer", "/v1/models/{model}/versions/{version}/infer",
                            "/v2/models/{model}/infer")
            for status in ("200", "400", "404", "422")
        })  # fmt: skip
    assert answers[0] == answers[1]
    assert counts[0] == counts[1]
    assert counts[0][("/v1/models/{model}/infer", "200")] == 1
    assert counts[0][("/v2/models/{model}/infer", "404")] == 1
    binary = answers[0][3]
    assert binary[2]["content-type"] == "application/octet-stream"
    assert binary[2]["inference-header-content-length"] is not None


def test_request_id_echoed_or_generated(client: httpx.Client) -> None:
    body = {"inputs": {"INPUT0": [[3.0]]}}
    r = client.post("/v1/models/identity_fp32/infer", json=body, headers={"X-Request-ID": "hot-1"})
    assert r.headers["x-request-id"] == "hot-1"
    ids = {client.post("/v1/models/identity_fp32/infer", json=body).headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)
    bad = client.post("/v1/models/identity_fp32/infer", json=body, headers={"X-Request-ID": "bad id;x"})
    assert bad.headers["x-request-id"] != "bad id;x" and len(bad.headers["x-request-id"]) == 32


def test_server_span_on_the_hot_path(start_gateway: GatewayFactory) -> None:
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
