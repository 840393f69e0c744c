"""The OpenAPI document is a contract clients generate code from (issue 15): no JSON answer is declared a
bare string, every route declares the shape it answers with, and every error it answers with in the
gateway's error shape (``{"error": {code, message, details}}``; under /v2 KServe's ``{"error": message}``). (The bodies themselves are checked
against these declarations on the real stack in tests/integration/test_openapi_contract.py.)"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from app.errors import error_body
from app.main import web_app
from app.settings import Settings

AUTH = {
    "auth": "required",
    "key_pepper": "c3a91f7e5d2b8046e1a7f3c9d05b2e84f6a1c7d3",
    "admin_token": "5e2b9d7f1a4c8e3b6d0f2a9c7e1b4d8f3a6c0e52",
}


def _spec(**settings: Any) -> dict[str, Any]:
    return web_app(Settings(**settings)).openapi()


def _operations(**settings: Any) -> list[tuple[str, str, str, dict[str, Any]]]:
    spec = _spec(**settings)
    out = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for code, response in op.get("responses", {}).items():
                for media, content in response.get("content", {}).items():
                    if media == "application/json":
                        out.append((method.upper(), path, code, content.get("schema", {})))
    return out


def test_no_json_answer_is_declared_a_bare_string() -> None:
    bare = [(m, p, c) for m, p, c, schema in _operations() if schema.get("type") == "string"]
    assert bare == []


def test_every_success_answer_declares_its_shape() -> None:
    undeclared = {(m, p) for m, p, c, schema in _operations() if c.startswith("2") and not schema}
    assert undeclared == set()


def test_kserve_health_routes_declare_json_bodies() -> None:
    declared = {(m, p, c): s for m, p, c, s in _operations()}
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/{model}/ready"):
        assert declared[("GET", path, "200")].get("$ref"), path
    assert declared[("GET", "/v2/health/ready", "400")]["$ref"].endswith("/V2Ready")


@pytest.mark.parametrize("settings", [{}, AUTH], ids=["auth-off", "auth-required"])
def test_every_error_answer_declares_the_error_shape(settings: dict[str, Any]) -> None:
    """4xx/5xx JSON answers reference Error (KServeError under /v2); the ready routes' 400 and /readyz's
    503 are the KServe / readiness bodies, not errors. FastAPI's own 422 (``{"detail": [...]}``, a shape
    the gateway never answers with) is gone."""
    bodies = {("GET", "/readyz", "503"), ("GET", "/v2/health/ready", "400"),
              ("GET", "/v2/models/{model}/ready", "400"), ("GET", "/v2/models/{model}/versions/{version}/ready", "400")}  # fmt: skip
    wrong = []
    for method, path, code, schema in _operations(**settings):
        if code[0] in "45" and (method, path, code) not in bodies:
            want = "KServeError" if path.startswith("/v2") else "Error"
            if schema.get("$ref") != f"#/components/schemas/{want}":
                wrong.append((method, path, code, schema))
    assert wrong == []
    assert "HTTPValidationError" not in _spec(**settings)["components"]["schemas"]


def test_operations_declare_the_errors_they_answer_with() -> None:
    declared = {(m, p): set() for m, p, _, _ in _operations()}
    for method, path, code, _ in _operations():
        declared[(method, path)].add(code)
    lookups = [op for op in declared if "{model}" in op[1] or "{job_id}" in op[1]]
    assert lookups and all("404" in declared[op] for op in lookups), [
        op for op in lookups if "404" not in declared[op]
    ]
    for op in [("POST", "/v1/models/{model}/jobs"), ("POST", "/v1/models/{model}/infer")]:
        assert {"400", "404", "413", "422", "503"} <= declared[op], op
    assert {"400", "404", "413", "503"} <= declared[("POST", "/v2/models/{model}/infer")]
    assert "409" in declared[("DELETE", "/v1/jobs/{job_id}")]
    assert "422" not in declared[("GET", "/v1/jobs/{job_id}")]  # a string path parameter: never refused


@pytest.mark.parametrize("kserve", [False, True])
def test_the_error_bodies_match_the_declared_error_schemas(kserve: bool) -> None:
    spec = _spec()
    schema = {"$ref": f"#/components/schemas/{'KServeError' if kserve else 'Error'}", **spec}
    body = error_body("model_not_found", "model 'x' is not in the repository", {"model": "x"}, kserve=kserve)
    jsonschema.validate(json.loads(body), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(error_body("c", "m", kserve=not kserve)), schema)
