"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) with their JavaScript, CSS and icon served from the
installed ``fastapi-offline`` package under ``/docs/assets/``: FastAPI's own pages load them from a CDN,
which leaves both pages blank in an air-gapped cluster. The pages name no external URL (Swagger UI's
online validator badge is off, ReDoc loads no Google fonts)."""

from __future__ import annotations

import functools
from importlib.resources import files
from importlib.resources.abc import Traversable
from typing import Any, Final

from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response

from app.errors import NotFound

ASSETS_PREFIX: Final = "/docs/assets/"
# the files fastapi-offline ships (swagger-ui-dist 5, redoc 2) and their media types
ASSETS: Final = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
ASSET_CACHE_CONTROL: Final = "public, max-age=86400"


def asset_dir() -> Traversable:
    return files("fastapi_offline") / "static"


@functools.cache
def asset_bytes(name: str) -> bytes:
    """One of ``ASSETS`` (~3 MB in all), read once per process on first use."""
    return (asset_dir() / name).read_bytes()


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve the documentation pages on ``app``, which must be built with ``docs_url=None`` and
    ``redoc_url=None`` (FastAPI's CDN pages off)."""
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url or f"{docs_url}/oauth2-redirect"
    router = APIRouter(include_in_schema=False)

    def page(request: Request, name: str) -> tuple[str, dict[str, Any]]:
        """The proxy's root path, and what every documentation page gets under it."""
        root = str(request.scope.get("root_path", "")).rstrip("/")
        return root, {"openapi_url": root + openapi_url, "title": f"{app.title} - {name}"}

    @router.get(docs_url)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root, common = page(request, "Swagger UI")
        prefix = root + ASSETS_PREFIX
        return get_swagger_ui_html(
            **common,
            oauth2_redirect_url=root + oauth2_redirect_url,
            swagger_js_url=prefix + "swagger-ui-bundle.js",
            swagger_css_url=prefix + "swagger-ui.css",
            swagger_favicon_url=prefix + "favicon.png",
            swagger_ui_parameters={"validatorUrl": None, **(app.swagger_ui_parameters or {})},
        )

    @router.get(oauth2_redirect_url)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @router.get(redoc_url)
    async def redoc(request: Request) -> HTMLResponse:
        root, common = page(request, "ReDoc")
        return get_redoc_html(
            **common,
            redoc_js_url=root + ASSETS_PREFIX + "redoc.standalone.js",
            redoc_favicon_url=root + ASSETS_PREFIX + "favicon.png",
            with_google_fonts=False,
        )

    @router.get(ASSETS_PREFIX + "{name}")
    async def asset(name: str) -> Response:
        media_type = ASSETS.get(name)
        if media_type is None:
            raise NotFound(f"no documentation asset {name!r}", details={"asset": name})
        headers = {"Cache-Control": ASSET_CACHE_CONTROL}
        return Response(asset_bytes(name), media_type=media_type, headers=headers)

    app.include_router(router)
