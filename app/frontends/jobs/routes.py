"""``/v1/models/{model}[/versions/{version}]/jobs`` (submit) and ``/v1/jobs/{id}`` (read, cancel)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.errors import PayloadTooLarge
from app.frontends.http.caller import context_of
from app.frontends.http.common import ORJSONResponse, owner_of
from app.frontends.http.deps import JobsDep
from app.frontends.http.schemas import (
    INFER_BODY_PROPERTIES,
    JOB_CANCEL_ERRORS,
    JOB_ERRORS,
    JOB_STATS_ERRORS,
    JOB_SUBMIT_RESPONSES,
    Job,
    JobAccepted,
    JobStats,
    body_doc,
)
from app.services.jobs.service import JobService, prepare_job

router = APIRouter(prefix="/v1", tags=["jobs"])

_BODY_DOC = body_doc(
    {
        **INFER_BODY_PROPERTIES,
        "webhook": {
            "type": "object",
            "properties": {
                "url": {"type": "string"},
                "events": {"type": "array", "items": {"type": "string", "enum": ["progress"]}},
            },
        },
        "priority": {"type": "string", "enum": ["high", "normal"]},
    },
    {"inputs": {"INPUT0": [[1.0, 2.0]]}, "webhook": {"url": "https://example.com/hook"}},
)


def _links(request: Request, job_id: str) -> dict[str, str]:
    base = str(request.base_url).rstrip("/")
    ws_base = "ws" + base[4:] if base.startswith("http") else base
    return {"status_url": f"{base}/v1/jobs/{job_id}", "ws_url": f"{ws_base}/v1/jobs/{job_id}/ws"}


def _too_large(limit: int, declared: int | None = None) -> PayloadTooLarge:
    got = f" ({declared} bytes)" if declared is not None else ""
    return PayloadTooLarge(
        f"job submission{got} exceeds the limit of {limit} bytes (TGW_JOB_MAX_BODY_BYTES)",
        {"limit_bytes": limit, **({"received_bytes": declared} if declared is not None else {})},
    )


async def _read_job_body(request: Request, limit: int) -> bytes:
    """The body, cut off at ``TGW_JOB_MAX_BODY_BYTES`` (a declared larger length is refused unread)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit, int(declared))
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _submit(service: JobService, request: Request, model: str, version: str | None) -> Response:
    ctx = context_of(request, "job")
    # a decoupled model's job streams; a version a traffic policy chose is pinned in the job (submit)
    info = await service.inference.resolve(model, version, stream=True, ctx=ctx)
    raw = await _read_job_body(request, service.max_body_bytes)
    # parsed within the bounds of the model's tensors (app.services.payload) and decoded for it: in a child
    # process when large (app.services.offload)
    body = await service.offload.decode(len(raw), prepare_job, raw, info, model, version)
    job = await service.submit(
        owner_of(request), model, version, body, request.headers.get("idempotency-key"), ctx
    )
    content: dict[str, Any] = {"id": job.id, "status": str(job.status), **_links(request, job.id)}
    headers = {"Location": content["status_url"]}
    if job.replayed:
        headers["Idempotent-Replayed"] = "true"
    return ORJSONResponse(content, status_code=202, headers=headers)


_SUBMIT: dict[str, Any] = {
    "openapi_extra": _BODY_DOC, "status_code": 202, "response_class": ORJSONResponse,
    "response_model": JobAccepted, "responses": JOB_SUBMIT_RESPONSES,
}  # fmt: skip


@router.post("/models/{model}/jobs", **_SUBMIT)
async def submit(model: str, request: Request, service: JobsDep) -> Response:
    return await _submit(service, request, model, None)


@router.post("/models/{model}/versions/{version}/jobs", **_SUBMIT)
async def submit_version(model: str, version: str, request: Request, service: JobsDep) -> Response:
    return await _submit(service, request, model, version)


@router.get("/jobs/stats", response_class=ORJSONResponse, response_model=JobStats, responses=JOB_STATS_ERRORS)
async def stats(service: JobsDep) -> Response:
    """Queue depth, oldest pending age, counts by status and webhook outcome, open WebSockets."""
    return ORJSONResponse(await service.stats())


@router.get("/jobs/{job_id}", response_class=ORJSONResponse, response_model=Job, responses=JOB_ERRORS)
async def get_job(job_id: str, request: Request, service: JobsDep) -> Response:
    job = await service.get(owner_of(request), job_id)
    return ORJSONResponse({**job, **_links(request, job_id)})


@router.delete(
    "/jobs/{job_id}", response_class=ORJSONResponse, response_model=Job, responses=JOB_CANCEL_ERRORS
)
async def cancel_job(job_id: str, request: Request, service: JobsDep) -> Response:
    job = await service.cancel(owner_of(request), job_id)
    return ORJSONResponse({**job, **_links(request, job_id)})
