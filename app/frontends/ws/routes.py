"""WebSockets: ``/v1/jobs/{id}/ws`` (one job's events, then its result) and ``/v1/ws`` (one socket, many
``infer``/``subscribe`` frames). Thin: accept, then the jobs service (``services.jobs.sockets``) serves,
with what the socket's key decides (``app.auth``: its recheck and rate per frame, its tier's bounds on
each Triton call)."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from app.auth.asgi import KeyCheck
from app.frontends.http.caller import caller_of
from app.frontends.http.common import owner_of
from app.frontends.http.deps import JobSocketsDep

router = APIRouter(tags=["jobs"])


@router.websocket("/v1/jobs/{job_id}/ws")
async def job_socket(ws: WebSocket, job_id: str, sockets: JobSocketsDep) -> None:
    await ws.accept()
    await sockets.serve_job(ws, owner_of(ws), job_id, check=KeyCheck.of(ws))


@router.websocket("/v1/ws")
async def multiplexed_socket(ws: WebSocket, sockets: JobSocketsDep) -> None:
    await ws.accept()
    await sockets.serve_multiplexed(ws, owner_of(ws), check=KeyCheck.of(ws), caller=caller_of(ws))
