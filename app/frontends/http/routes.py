"""The route tables of the HTTP pipeline (``app.frontends.http.pipeline``).

**Raw routes** (``RawRoute``): the routes the pipeline answers itself, without FastAPI (the infer routes,
thousands a second). Each door declares its rows (``app.frontends.rest.routes.RAW_ROUTES``,
``app.frontends.kserve_http.routes.RAW_ROUTES``); ``app.main`` puts them in one ``RawRoutes`` table, and
that table feeds:

- the pipeline's matcher (``RawRoutes.match``: one ``str.split`` and a few comparisons, no regex);
- the handler a match calls, ``handler(gateway, params, body, headers, ctx) -> Reply`` (the table binds the
  gateway: ``RawRouter``), or ``-> SSEReply`` for a streamed answer (``app.frontends.http.sse``);
- the route template of the metrics, the span and the access line (``RawRoute.template``);
- the authentication class of the path (``RawRoutes.auth_class``, handed to ``app.auth``'s stage as its
  classifier: app.auth sits below the doors);
- the OpenAPI document (``install_raw_routes``: each row's operation, its path parameters from the
  template) and the ``405`` of any other method on a raw path.

**Framework routes** (``RouteTemplates``): the templates of FastAPI's routes, compiled once from the
application's ``routes`` (Starlette's public ``route.matches(scope)`` / ``route.path``), for what the
pipeline answers before FastAPI routes it: a refused request (401/403/429, 413) and a refused WebSocket
handshake are counted and logged under their route's template too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from fastapi import FastAPI
from starlette.exceptions import HTTPException
from starlette.routing import Match, Route, WebSocketRoute
from starlette.types import Scope

from app.codecs.common import Reply
from app.frontends.http.sse import SSEReply
from app.request_context import Door, RequestContext, route_path

if TYPE_CHECKING:
    from app.gateway import Gateway

Headers = Mapping[bytes, bytes]
Params = Mapping[str, str]
# A handler answers a ``Reply``, or an ``SSEReply`` (a streamed answer: app.frontends.http.sse)
RawHandler = Callable[["Gateway", Params, bytes, Headers, RequestContext], Awaitable[Reply | SSEReply]]


@dataclass(frozen=True, slots=True)
class RawRoute:
    """One raw route: ``method`` and ``template`` (``/v1/models/{model}/infer``: literal segments and
    ``{name}`` parameters, each one non-empty path segment), its ``handler``, its OpenAPI ``operation``
    (the operation object; ``parameters`` for the template's names are added), its authentication class
    (``"key"``, ``"admin"`` or ``"open"``, as ``app.auth.stage.path_class``), and the ``door`` its requests'
    context names (``RequestContext.door``)."""

    method: str
    template: str
    handler: RawHandler = field(compare=False)
    door: Door = field(default="v1", kw_only=True)
    operation: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    auth_class: str = "key"

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.template.split("/"))

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(s[1:-1] for s in self.segments if _is_param(s))


def _is_param(segment: str) -> bool:
    return len(segment) > 2 and segment[0] == "{" and segment[-1] == "}"


class RawMatch(NamedTuple):
    route: RawRoute
    params: dict[str, str]


class _Compiled(NamedTuple):
    route: RawRoute
    literals: tuple[tuple[int, str], ...]  # (segment index, text) to compare
    params: tuple[tuple[int, str], ...]  # (segment index, name) to capture (non-empty)


class RawRoutes:
    """The raw routes of one application, prepared once: rows grouped by method, then by segment count,
    the last literal segments a first cheap filter (``str.endswith``) for the paths no row can match. A
    match is one ``str.split`` and, for the rows of the path's method and segment count, their literal
    segments compared and their parameters taken (the first row in declaration order wins). Measured:
    ~1.2-1.4 µs an infer path, ~0.45 µs more than matchers generated as Python source from the rows (under
    1 % of a cache hit's gateway CPU, docs/performance.md), not worth code written at run time."""

    def __init__(self, routes: Iterable[RawRoute]) -> None:
        self.routes = tuple(routes)
        buckets: dict[str, dict[int, list[_Compiled]]] = {}
        suffixes: set[str] = set()
        seen: set[tuple[str, str]] = set()
        for route in self.routes:
            segments = route.segments
            if segments[0] or not route.template.startswith("/"):
                raise ValueError(f"a raw route's template starts with '/': {route.template!r}")
            if (route.method, route.template) in seen:
                raise ValueError(f"raw route declared twice: {route.method} {route.template}")
            seen.add((route.method, route.template))
            literals = tuple((i, s) for i, s in enumerate(segments) if i and not _is_param(s))
            params = tuple((i, s[1:-1]) for i, s in enumerate(segments) if _is_param(s))
            buckets.setdefault(route.method, {}).setdefault(len(segments), []).append(
                _Compiled(route, literals, params)
            )
            last = segments[-1]
            suffixes.add("" if _is_param(last) else "/" + last)  # "": every path is a candidate
        self._buckets = {
            method: {n: tuple(rows) for n, rows in counts.items()} for method, counts in buckets.items()
        }
        self._suffixes = tuple(sorted(suffixes))
        self._methods = tuple(buckets)

    def match(self, method: str, path: str) -> RawMatch | None:
        """The first row (in declaration order) whose method, segment count and literal segments are the
        path's, with every parameter a non-empty segment; else None."""
        if not path.endswith(self._suffixes):
            return None
        counts = self._buckets.get(method)
        if counts is None:
            return None
        parts = path.split("/")
        for row in counts.get(len(parts), ()):
            for i, text in row.literals:
                if parts[i] != text:
                    break
            else:
                params = {name: parts[i] for i, name in row.params}
                if all(params.values()):
                    return RawMatch(row.route, params)
        return None

    def match_scope(self, scope: Scope) -> RawMatch | None:
        return self.match(scope["method"], route_path(scope))

    def __iter__(self) -> Iterator[RawRoute]:
        return iter(self.routes)

    def __len__(self) -> int:
        return len(self.routes)

    def auth_class(self, path: str) -> str | None:
        """The authentication class of a raw route's path (any method), None for other paths: the
        classifier ``app.auth``'s stage gets (``AuthStage(classify=...)``)."""
        if not path.endswith(self._suffixes):
            return None
        for method in self._methods:
            found = self.match(method, path)
            if found is not None:
                return found.route.auth_class
        return None

    def templates(self) -> list[str]:
        """Each template once, in declaration order."""
        return list(dict.fromkeys(r.template for r in self.routes))


class RawRouter:
    """What the pipeline calls: ``match(scope)`` and ``handle(match, body, headers)``. The one adapter
    between the table's handlers and the gateway: ``gateway()`` gives the process's ``Gateway`` (built in
    the lifespan) at call time."""

    def __init__(self, routes: RawRoutes, gateway: Callable[[], Gateway]) -> None:
        self.routes = routes
        self.gateway = gateway
        self.match: Callable[[Scope], RawMatch | None] = routes.match_scope  # no extra call per request

    async def handle(
        self, match: RawMatch, body: bytes, headers: Headers, ctx: RequestContext
    ) -> Reply | SSEReply:
        return await match.route.handler(self.gateway(), match.params, body, headers, ctx)


# --- the application side: OpenAPI and the other methods ---------------------------------------------
def _path_parameter(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def operation_of(route: RawRoute) -> dict[str, Any]:
    """The row's OpenAPI operation with its path parameters (from the template) first."""
    op = dict(route.operation)
    params = [_path_parameter(name) for name in route.param_names]
    op["parameters"] = [*params, *op.get("parameters", ())]
    return op


def install_raw_routes(app: FastAPI, routes: RawRoutes) -> None:
    """On the FastAPI app: a ``405`` (with ``Allow``) for the other methods on a raw route's path (only the
    table's methods reach the pipeline's router; Triton answers the same), and the raw operations in
    ``app.openapi()``."""
    allowed: dict[str, list[str]] = {}
    for route in routes:
        allowed.setdefault(route.template, []).append(route.method)
    for template, methods in allowed.items():
        allow = ", ".join(methods)
        others = [m for m in ("GET", "POST", "PUT", "PATCH", "DELETE") if m not in methods]
        app.router.add_api_route(template, _not_allowed(template, allow), methods=others,
                                 include_in_schema=False)  # fmt: skip

    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            paths = schema.setdefault("paths", {})
            for route in routes:
                paths.setdefault(route.template, {})[route.method.lower()] = operation_of(route)
        return app.openapi_schema or {}

    app.openapi = openapi  # type: ignore[method-assign]


def _not_allowed(template: str, allow: str) -> Callable[[], Awaitable[None]]:
    async def not_allowed() -> None:
        raise HTTPException(405, f"{template} takes {allow}", headers={"Allow": allow})

    return not_allowed


class RouteTemplates:
    """The templates of an application's routes (Starlette's ``Route`` and ``WebSocketRoute``, FastAPI's
    included: the routers' ``routes`` and the app's own; FastAPI holds an included router as one opaque
    route), compiled once, for requests answered before the application routes them. ``template(scope)``:
    the path of the route that would serve it (a route whose path matches but not the method counts:
    FastAPI would answer 405 under it), None for an unknown path."""

    def __init__(self, routes: Iterable[Any]) -> None:
        self.routes = tuple(r for r in routes if isinstance(r, Route | WebSocketRoute))

    def template(self, scope: Scope) -> str | None:
        partial: str | None = None
        for route in self.routes:
            found, _ = route.matches(scope)
            if found is Match.FULL:
                return str(route.path)
            if found is Match.PARTIAL and partial is None:
                partial = str(route.path)
        return partial
