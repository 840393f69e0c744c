"""The inference hot path without FastAPI's per-request machinery.

``POST /v1/models/{model}[/versions/{version}]/infer`` and ``POST /v2/models/{model}[/versions/{version}]
/infer`` are the only requests that arrive thousands of times a second. This ASGI middleware serves them by
calling the very handlers the routers use (``app.routers.infer.serve_v1``, ``app.routers.v2.serve_v2``), so
answers, headers and errors are the same, but skips route matching over every route, dependency
resolution, and the exception/telemetry middleware layers. ``GatewayError``s are rendered by the same
handler as elsewhere; anything else propagates to Starlette's ``ServerErrorMiddleware`` (the 500 handler),
as it would from a route. It sits inside ``RequestContextMiddleware``, so the request id and the body
limit apply unchanged. Everything else (other methods and paths, the OpenAPI schema) goes to FastAPI.
``TGW_FAST_PATH=false`` turns it off.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import GatewayError, gateway_error_response


def match_infer(path: str) -> tuple[str, str, str | None] | None:
    """``/v1/models/m/infer`` -> ("v1", "m", None); ``/v2/models/m/versions/3/infer`` -> ("v2", "m", "3")."""
    parts = path.split("/")
    n = len(parts)
    if n not in (5, 7) or parts[0] or parts[2] != "models" or parts[-1] != "infer":
        return None
    api = parts[1]
    if api not in ("v1", "v2") or not parts[3]:
        return None
    if n == 5:
        return api, parts[3], None
    if parts[4] != "versions" or not parts[5]:
        return None
    return api, parts[3], parts[5]


class InferFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        route = match_infer(path) if path.endswith("/infer") else None
        if route is None:
            await self.app(scope, receive, send)
            return
        from app.routers.infer import serve_v1
        from app.routers.v2 import serve_v2

        api, model, version = route
        request = Request(scope, receive)
        state = scope["app"].state
        try:
            if api == "v1":
                response = await serve_v1(state.inference, request, model, version)
            else:
                response = await serve_v2(state.inference, state.registry, request, model, version)
        except GatewayError as exc:
            response = gateway_error_response(request, exc)
        await response(scope, receive, send)
