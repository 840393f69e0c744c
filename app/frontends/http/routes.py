"""The route tables of the HTTP pipeline (``app.frontends.http.pipeline``).

**Raw routes** (``RawRoute``): the routes the pipeline answers itself, without FastAPI (the infer routes,
thousands a second). Each door declares its rows (``app.frontends.rest.routes.RAW_ROUTES``,
``app.frontends.kserve_http.routes.RAW_ROUTES``); ``app.main`` puts them in one ``RawRoutes`` table, and
that table feeds:

- the pipeline's matcher (``RawRoutes.match``: one ``str.split`` and a few comparisons, no regex);
- the handler a match calls, ``handler(gateway, params, body, headers, ctx) -> Reply`` (the table binds the
  gateway: ``RawRouter``);
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
from app.request_context import Door, RequestContext, route_path

if TYPE_CHECKING:
    from app.gateway import Gateway

Headers = Mapping[bytes, bytes]
Params = Mapping[str, str]
RawHandler = Callable[["Gateway", Params, bytes, Headers, RequestContext], Awaitable[Reply]]


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


def _matcher_source(
    buckets: Mapping[str, Mapping[int, list[_Compiled]]], routes: tuple[RawRoute, ...]
) -> str:
    """``match(method, path)`` and ``match_scope(scope)``: ``RawMatch(row, params)`` of the first row (in
    declaration order) whose method, segment count and literal segments are the path's, with every
    parameter a non-empty segment; else None. Only the rows' methods, indexes and literal texts (``repr``)
    and parameter names (identifiers) go into the source."""
    body = [
        "    if not path.endswith(SUFFIXES):",
        "        return None",
    ]
    for method, lengths in buckets.items():
        body += [f"    if method == {method!r}:", "        parts = path.split('/')", "        n = len(parts)"]
        for count, rows in lengths.items():
            body.append(f"        if n == {count}:")
            for row in rows:
                conditions = [f"parts[{i}] == {text!r}" for i, text in row.literals]
                conditions += [f"parts[{i}]" for i, _ in row.params]
                params = ", ".join(f"{name!r}: parts[{i}]" for i, name in row.params)
                body.append(f"            if {' and '.join(conditions)}:")
                body.append(
                    f"                return RawMatch(ROUTES[{routes.index(row.route)}], {{{params}}})"
                )
    body.append("    return None")
    head = ["def match(method, path):"]
    scope_head = ["def match_scope(scope):", "    method = scope['method']", "    path = route_path(scope)"]
    return "\n".join([*head, *body, "", *scope_head, *body]) + "\n"


class RawRoutes:
    """The raw routes of one application, compiled once into one matcher: rows grouped by method, then by
    segment count, the last literal segments a first cheap filter (``str.endswith``) for the paths no row
    can match; a match is one ``str.split`` and the row's string comparisons, written out as Python source
    (``_matcher_source``) so it costs what a hand-written matcher does (a loop over the rows' tuples
    measured ~25 % slower, a regex or ``operator.itemgetter`` slower still)."""

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
            if not all(name.isidentifier() for _, name in params):
                raise ValueError(f"a raw route's parameters are identifiers: {route.template!r}")
            buckets.setdefault(route.method, {}).setdefault(len(segments), []).append(
                _Compiled(route, literals, params)
            )
            last = segments[-1]
            suffixes.add("" if _is_param(last) else "/" + last)
        # "" (a row ending in a parameter) makes every path a candidate.
        namespace: dict[str, Any] = {
            "SUFFIXES": tuple(sorted(suffixes)), "RawMatch": RawMatch, "route_path": route_path,
            "ROUTES": self.routes,
        }  # fmt: skip
        exec(_matcher_source(buckets, self.routes), namespace)  # source built from the rows only
        self.match: Callable[[str, str], RawMatch | None] = namespace["match"]
        self.match_scope: Callable[[Scope], RawMatch | None] = namespace["match_scope"]
        self._suffixes = namespace["SUFFIXES"]
        self._methods = tuple(buckets)

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

    async def handle(self, match: RawMatch, body: bytes, headers: Headers, ctx: RequestContext) -> Reply:
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
