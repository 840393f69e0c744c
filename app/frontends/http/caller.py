"""FastAPI dependencies of the caller: the ``Principal`` the auth stage admitted (anonymous when
TGW_AUTH=off) and the ``AuthStage`` itself, for the key routes (``app.frontends.admin.keys``) and any router.

``async def`` on purpose, as in ``app.frontends.http.deps``: a plain ``def`` dependency would cost a thread
hand-off."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from starlette.requests import HTTPConnection

from app.auth.principal import ANONYMOUS, Principal
from app.auth.stage import AuthStage


async def get_principal(conn: HTTPConnection) -> Principal:
    principal = conn.scope.get("state", {}).get("principal")
    return principal if isinstance(principal, Principal) else ANONYMOUS


async def get_auth(conn: HTTPConnection) -> AuthStage:
    stage: AuthStage = conn.app.state.auth
    return stage


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AuthDep = Annotated[AuthStage, Depends(get_auth)]
