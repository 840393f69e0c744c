"""The request pipeline's pure parts: the raw route table (matching, auth classes) and the Server-Timing header."""

from typing import Any

import pytest

from app.auth.stage import classifier
from app.codecs.common import JSON, Reply
from app.frontends.http.pipeline import server_timing
from app.frontends.http.routes import RawRoute, RawRoutes
from app.gateway import build_edge
from app.main import create_app, raw_routes
from app.observability.requests import Requests
from app.request_context import route_path
from app.settings import Settings


def _table() -> RawRoutes:
    return raw_routes()


def test_the_raw_route_table_declares_the_infer_and_streaming_routes() -> None:
    assert [(r.method, r.template) for r in _table()] == [
        ("POST", "/v1/models/{model}/infer"),
        ("POST", "/v1/models/{model}/versions/{version}/infer"),
        ("POST", "/v1/models/{model}/stream"),
        ("POST", "/v1/models/{model}/versions/{version}/stream"),
        ("POST", "/v2/models/{model}/infer"),
        ("POST", "/v2/models/{model}/versions/{version}/infer"),
        ("POST", "/v2/models/{model}/generate"),
        ("POST", "/v2/models/{model}/versions/{version}/generate"),
        ("POST", "/v2/models/{model}/generate_stream"),
        ("POST", "/v2/models/{model}/versions/{version}/generate_stream"),
    ]


def test_every_row_matches_its_template() -> None:
    table = _table()
    for row in table:
        path = row.template.replace("{model}", "m").replace("{version}", "3")
        found = table.match(row.method, path)
        assert found is not None and found.route is row, path
        assert found.params == {name: {"model": "m", "version": "3"}[name] for name in row.param_names}
        # a key's routes; the streaming ones hold their slot for a stream's life (app.auth.stage "stream")
        expected = "stream" if row.template.endswith("stream") else "key"
        assert table.auth_class(path) == row.auth_class == expected


def test_match_infer_paths() -> None:
    table = _table()

    def match(path: str) -> tuple[str, dict[str, str]] | None:
        found = table.match("POST", path)
        return (found.route.template, found.params) if found is not None else None

    assert match("/v1/models/m/infer") == ("/v1/models/{model}/infer", {"model": "m"})
    assert match("/v2/models/m/versions/3/infer") == (
        "/v2/models/{model}/versions/{version}/infer", {"model": "m", "version": "3"})  # fmt: skip
    assert match("/v1/models/m/versions/3/infer") == (
        "/v1/models/{model}/versions/{version}/infer", {"model": "m", "version": "3"})  # fmt: skip
    for path in ("/v1/models//infer", "/v3/models/m/infer", "/v1/models/m/x/infer", "/v1/models/m/infer/x",
                 "/v1/models/m/versions//infer", "/v1/jobs/m/infer", "/v1/models/m/jobs", "/healthz",
                 "v1/models/m/infer", "/v1/models/m/versions/3/4/infer", ""):  # fmt: skip
        assert match(path) is None, path
        assert table.auth_class(path) is None, path
    assert table.match("GET", "/v1/models/m/infer") is None  # other methods: FastAPI's 405


def test_a_new_door_adds_rows() -> None:
    async def handler(*_: object) -> Reply:
        return Reply(200, b"{}", JSON)

    table = RawRoutes((*_table(), RawRoute("POST", "/v9/{model}/generate", handler, auth_class="admin")))
    found = table.match("POST", "/v9/m/generate")
    assert found is not None and found.params == {"model": "m"}
    assert table.match("POST", "/v1/models/m/infer") is not None
    classify = classifier(table.auth_class)
    assert classify("/v9/m/generate") == "admin"
    assert classify("/v1/models/m/infer") == "key"
    assert classify("/healthz") == "open" and classify("/metrics") == "admin"
    with pytest.raises(ValueError, match="twice"):
        RawRoutes((*table, RawRoute("POST", "/v9/{model}/generate", handler)))
    # a row ending in a parameter (every path is a candidate), another method
    things = RawRoutes((*table, RawRoute("GET", "/v9/things/{thing}", handler)))
    found = things.match("GET", "/v9/things/x")
    assert found is not None and found.params == {"thing": "x"}
    assert things.match("POST", "/v9/things/x") is None and things.match("GET", "/v9/things/") is None
    assert things.match("POST", "/v1/models/m/infer") is not None
    found = things.match_scope({"method": "POST", "path": "/gw/v2/models/m/infer", "root_path": "/gw"})
    assert found is not None and found.route.template == "/v2/models/{model}/infer"


def test_server_timing() -> None:
    assert server_timing({"triton": 0.00093, "cache": 0.00021}, 0.0014) == (
        b"cache;dur=0.21, triton;dur=0.93, total;dur=1.40"
    )
    assert server_timing({}, 0.0001) == b"total;dur=0.10"


def test_route_path_drops_the_root_path_a_proxy_mounted_the_app_under() -> None:
    assert route_path({"path": "/gw/v1/models/m/infer", "root_path": "/gw"}) == "/v1/models/m/infer"
    assert route_path({"path": "/v1/models/m/infer", "root_path": ""}) == "/v1/models/m/infer"
    assert route_path({"path": "/other/v1", "root_path": "/gw"}) == "/other/v1"


# --- what the pipeline refuses before FastAPI routes it is counted under its route's template ------------
AUTH = {
    "auth": "required",
    "key_pepper": "c3a91f7e5d2b8046e1a7f3c9d05b2e84f6a1c7d3",
    "admin_token": "5e2b9d7f1a4c8e3b6d0f2a9c7e1b4d8f3a6c0e52",
    "auth_failed_per_minute": 1,
    "max_body_bytes": 1024,
}


def _pipeline() -> tuple[Any, list[tuple[str, str | None, str]]]:
    pipeline = create_app(Settings(**AUTH))
    seen: list[tuple[str, str | None, str]] = []
    pipeline.requests = Requests([lambda info: seen.append((info.method, info.modified_handler,
                                                           info.modified_status))])  # fmt: skip
    return pipeline, seen


async def _call(
    app: Any, scope_type: str, method: str, path: str, headers: list[Any]
) -> list[dict[str, Any]]:
    scope = {
        "type": scope_type, "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http" if scope_type == "http" else "ws", "path": path, "raw_path": path.encode(),
        "query_string": b"", "root_path": "", "headers": headers, "client": ("10.0.0.9", 1),
        "server": ("127.0.0.1", 2), "state": {}, "extensions": {"websocket.http.response": {}},
    }  # fmt: skip
    first = {"type": "http.request", "body": b"{}", "more_body": False}
    inbox = [first if scope_type == "http" else {"type": "websocket.connect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0) if inbox else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_a_job_submission_refused_before_fastapi_is_counted_under_its_template() -> None:
    app, seen = _pipeline()
    for _ in range(2):  # 401 (no key), then 429 (this address failed too often)
        await _call(app, "http", "POST", "/v1/models/m/jobs", [(b"content-type", b"application/json")])
    await _call(app, "http", "POST", "/v1/models/m/versions/2/jobs", [])
    assert seen == [
        ("POST", "/v1/models/{model}/jobs", "401"),
        ("POST", "/v1/models/{model}/jobs", "429"),
        ("POST", "/v1/models/{model}/versions/{version}/jobs", "429"),
    ]
    seen.clear()  # a raw route refused: the raw row's template; an unknown path: none (left out)
    await _call(app, "http", "POST", "/v2/models/m/infer", [])
    await _call(app, "http", "GET", "/nowhere", [])
    assert seen == [("POST", "/v2/models/{model}/infer", "429")]


async def test_a_body_refused_before_fastapi_is_counted_under_its_template() -> None:
    app, seen = _pipeline()
    admin = (b"authorization", b"Bearer " + AUTH["admin_token"].encode())  # type: ignore[attr-defined]
    sent = await _call(app, "http", "POST", "/v2/repository/index", [admin, (b"content-length", b"4096")])
    assert sent[0]["status"] == 413
    assert seen == [("POST", "/v2/repository/index", "413")]


async def test_a_refused_websocket_handshake_is_counted_under_its_template() -> None:
    app, seen = _pipeline()
    sent = await _call(app, "websocket", "GET", "/v1/jobs/j-1/ws", [])
    assert sent[0]["type"] == "websocket.http.response.start" and sent[0]["status"] == 401
    await _call(app, "websocket", "GET", "/v1/ws", [])
    await _call(app, "websocket", "GET", "/v1/jobs/j-1/nope", [])
    assert seen == [("GET", "/v1/jobs/{job_id}/ws", "401"), ("GET", "/v1/ws", "429")]


def test_the_edge_is_built_once_and_shared_by_the_pipeline_and_the_app() -> None:
    pipeline = create_app(Settings(**AUTH))
    web = pipeline.app
    edge = web.state.edge  # type: ignore[attr-defined]
    assert pipeline.requests is edge.requests and pipeline.lifecycle is edge.lifecycle
    assert pipeline.admission is edge.auth is web.state.auth  # type: ignore[attr-defined]
    assert edge.auth.path_class("/v1/models/m/infer") == "key"  # the raw table's class, handed in
    assert build_edge(Settings(), serving=False).auth is None  # tgw worker: no auth stage
