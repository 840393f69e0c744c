"""Declared JSON answers have JSON bodies matching their declared schema, on the real stack (issue 15:
four /v2 live/ready routes answered an empty body where JSON was declared)."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema
import pytest

pytestmark = pytest.mark.integration

CASES = [
    ("GET", "/healthz", 200), ("GET", "/readyz", 200), ("GET", "/v1/models", 200),
    ("GET", "/v1/models/identity_fp32", 200), ("GET", "/v1/models/versioned_fp32/versions/1", 200),
    ("GET", "/v2", 200), ("GET", "/v2/health/live", 200), ("GET", "/v2/health/ready", 200),
    ("POST", "/v2/repository/index", 200), ("GET", "/v2/models/identity_fp32", 200),
    ("GET", "/v2/models/identity_fp32/ready", 200), ("GET", "/v2/models/versioned_fp32/versions/99/ready", 400),
    ("GET", "/v2/models/identity_fp32/config", 200),
]  # fmt: skip


def _template(spec: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    for template, ops in spec["paths"].items():
        parts, given = template.split("/"), path.split("/")
        if len(parts) == len(given) and all(
            a == b or a.startswith("{") for a, b in zip(parts, given, strict=True)
        ):
            if method.lower() in ops:
                return ops[method.lower()]  # type: ignore[no-any-return]
    raise AssertionError(f"{method} {path} is not in the OpenAPI document")


def test_bodies_match_the_declared_schemas(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    for method, path, status in CASES:
        r = client.request(method, path)
        assert r.status_code == status, (path, r.status_code, r.text[:200])
        declared = _template(spec, method, path)["responses"][str(status)]["content"]["application/json"]
        assert r.headers["content-type"].startswith("application/json"), path
        schema = {**declared["schema"], "components": spec["components"]}
        jsonschema.validate(r.json(), schema)  # an empty body fails r.json()
