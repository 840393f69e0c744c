"""The request pipeline's pure parts: infer-route matching and the Server-Timing header."""

from app.frontends.http.pipeline import match_infer, server_timing
from app.request_context import route_path


def test_match_infer() -> None:
    assert match_infer("/v1/models/m/infer") == ("v1", "m", None)
    assert match_infer("/v2/models/m/versions/3/infer") == ("v2", "m", "3")
    assert match_infer("/v1/models/m/versions/3/infer") == ("v1", "m", "3")
    for path in ("/v1/models//infer", "/v3/models/m/infer", "/v1/models/m/x/infer", "/v1/models/m/infer/x",
                 "/v1/models/m/versions//infer", "/v1/jobs/m/infer"):  # fmt: skip
        assert match_infer(path) is None, path


def test_server_timing() -> None:
    assert server_timing({"triton": 0.00093, "cache": 0.00021}, 0.0014) == (
        b"cache;dur=0.21, triton;dur=0.93, total;dur=1.40"
    )
    assert server_timing({}, 0.0001) == b"total;dur=0.10"


def test_route_path_drops_the_root_path_a_proxy_mounted_the_app_under() -> None:
    assert route_path({"path": "/gw/v1/models/m/infer", "root_path": "/gw"}) == "/v1/models/m/infer"
    assert route_path({"path": "/v1/models/m/infer", "root_path": ""}) == "/v1/models/m/infer"
    assert route_path({"path": "/other/v1", "root_path": "/gw"}) == "/other/v1"
