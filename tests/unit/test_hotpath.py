"""Route matching of the hot path (app.hotpath)."""

from app.hotpath import match_infer


def test_match_infer() -> None:
    assert match_infer("/v1/models/m/infer") == ("v1", "m", None)
    assert match_infer("/v2/models/m/versions/3/infer") == ("v2", "m", "3")
    assert match_infer("/v1/models/m/versions/3/infer") == ("v1", "m", "3")
    for path in ("/v1/models//infer", "/v3/models/m/infer", "/v1/models/m/x/infer", "/v1/models/m/infer/x",
                 "/v1/models/m/versions//infer", "/v1/jobs/m/infer"):  # fmt: skip
        assert match_infer(path) is None, path
