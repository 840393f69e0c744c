"""``/v1/models/{model}[/versions/{version}]/jobs`` (submit) and ``/v1/jobs/{id}`` (read, cancel)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.deps import JobsDep
from app.request_context import current_request_id
from app.routers.common import ORJSONResponse, read_json
from app.routers.infer import INFER_BODY_PROPERTIES, body_doc
from app.services.jobs.service import JobService

router = APIRouter(prefix="/v1", tags=["jobs"])

_BODY_DOC = body_doc(
    {
        **INFER_BODY_PROPERTIES,
        "webhook": {"type": "object", "properties": {"url": {"type": "string"}}},
        "priority": {"type": "string", "enum": ["high", "normal"]},
    },
    {"inputs": {"INPUT0": [[1.0, 2.0]]}, "webhook": {"url": "https://example.com/hook"}},
)


def _links(request: Request, job_id: str) -> dict[str, str]:
    base = str(request.base_url).rstrip("/")
    ws_base = "ws" + base[4:] if base.startswith("http") else base
    return {"status_url": f"{base}/v1/jobs/{job_id}", "ws_url": f"{ws_base}/v1/jobs/{job_id}/ws"}


async def _submit(service: JobService, request: Request, model: str, version: str | None) -> Response:
    body = await read_json(request)
    job = await service.submit(
        model, version, body, request.headers.get("idempotency-key"), current_request_id() or ""
    )
    replayed = job.pop("replayed")
    content: dict[str, Any] = {**job, **_links(request, job["id"])}
    headers = {"Location": content["status_url"]}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return ORJSONResponse(content, status_code=202, headers=headers)


@router.post("/models/{model}/jobs", openapi_extra=_BODY_DOC, status_code=202, response_class=ORJSONResponse)
async def submit(model: str, request: Request, service: JobsDep) -> Response:
    return await _submit(service, request, model, None)


@router.post(
    "/models/{model}/versions/{version}/jobs", openapi_extra=_BODY_DOC, status_code=202,
    response_class=ORJSONResponse,
)  # fmt: skip
async def submit_version(model: str, version: str, request: Request, service: JobsDep) -> Response:
    return await _submit(service, request, model, version)


@router.get("/jobs/stats", response_class=ORJSONResponse)
async def stats(service: JobsDep) -> Response:
    """Queue depth, oldest pending age, counts by status and webhook outcome, open WebSockets."""
    return ORJSONResponse(await service.stats())


@router.get("/jobs/{job_id}", response_class=ORJSONResponse)
async def get_job(job_id: str, request: Request, service: JobsDep) -> Response:
    job = await service.get(job_id)
    return ORJSONResponse({**job, **_links(request, job_id)})


@router.delete("/jobs/{job_id}", response_class=ORJSONResponse)
async def cancel_job(job_id: str, request: Request, service: JobsDep) -> Response:
    job = await service.cancel(job_id)
    return ORJSONResponse({**job, **_links(request, job_id)})
