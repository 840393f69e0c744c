"""/docs (Swagger UI) and /redoc load their JavaScript, CSS and icon from the gateway itself (the
fastapi-offline package's files), never from a CDN: the pages work in an air-gapped cluster."""

from __future__ import annotations

import re

import httpx
import pytest

from app.auth.stage import path_class

pytestmark = pytest.mark.integration

ASSET_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
EXTERNAL = re.compile(r"(?:https?:)?//[\w.-]+", re.IGNORECASE)


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("/docs", {"/docs/assets/swagger-ui-bundle.js": "javascript", "/docs/assets/swagger-ui.css": "css",
                   "/docs/assets/favicon.png": "image/png"}),
        ("/redoc", {"/docs/assets/redoc.standalone.js": "javascript", "/docs/assets/favicon.png": "image/png"}),
    ],
)  # fmt: skip
def test_docs_page_assets_are_served_locally(
    client: httpx.Client, page: str, expected: dict[str, str]
) -> None:
    response = client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert EXTERNAL.findall(html) == [], f"{page} names an external URL"
    urls = set(ASSET_URL.findall(html))
    assert urls == set(expected), urls
    assert "/openapi.json" in html
    for url, kind in expected.items():
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert kind in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 1000, url
        assert "max-age" in asset.headers["cache-control"]
        assert path_class(url) == "open"  # loads without a key when TGW_AUTH=required, as the page does
    if page == "/docs":
        assert '"validatorUrl": null' in html  # no badge fetched from validator.swagger.io
        assert client.get("/docs/oauth2-redirect").status_code == 200


def test_docs_assets_are_only_the_packaged_files(client: httpx.Client) -> None:
    assert client.get("/openapi.json").status_code == 200
    for name in ("../core.py", "..%2Fcore.py", "consts.py", "nope.js"):
        response = client.get(f"/docs/assets/{name}")
        assert response.status_code == 404, name
