"""The caller of an HTTP request: the ``Principal`` the auth stage admitted (anonymous when TGW_AUTH=off)
and the ``AuthStage`` itself as FastAPI dependencies (the key routes, ``app.frontends.admin.keys``), and
``context_of``: the request's ``RequestContext`` for a door served by FastAPI (jobs, ``/v1/ws``), as the
pipeline builds it for the infer routes.

``async def`` on purpose, as in ``app.frontends.http.deps``: a plain ``def`` dependency would cost a thread
hand-off."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from app.auth.principal import ANONYMOUS, Principal
from app.auth.stage import AuthStage
from app.request_context import Caller, Door, RequestContext, current_request_id


async def get_principal(conn: HTTPConnection) -> Principal:
    principal = conn.scope.get("state", {}).get("principal")
    return principal if isinstance(principal, Principal) else ANONYMOUS


async def get_auth(conn: HTTPConnection) -> AuthStage:
    stage: AuthStage = conn.app.state.auth
    return stage


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AuthDep = Annotated[AuthStage, Depends(get_auth)]


def caller_of(conn: HTTPConnection) -> Caller | None:
    """The key the pipeline admitted for this connection (None: TGW_AUTH=off)."""
    principal = conn.scope.get("state", {}).get("principal")
    return principal if isinstance(principal, Caller) else None


def context_of(conn: HTTPConnection, door: Door) -> RequestContext:
    """The context of a request the pipeline admitted (its request id, its key, its ``Cache-Control``)."""
    rid = conn.scope.get("state", {}).get("request_id") or current_request_id()
    return RequestContext.open(door, rid, caller_of(conn), cache_control=conn.headers.get("cache-control"))
