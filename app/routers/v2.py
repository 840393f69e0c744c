"""KServe v2 / Triton HTTP protocol under ``/v2``: what ``tritonclient.http`` needs, with the cache in the
inference path. Errors keep the gateway's one shape."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter
from starlette.responses import Response

from app.codecs import encoding
from app.codecs import v2 as kserve
from app.codecs.common import Reply
from app.deps import AdminDep, HealthDep, RegistryDep
from app.request_context import current_request_id
from app.routers.common import Headers, ORJSONResponse
from app.routers.infer import header_value
from app.services.inference import InferenceService, cache_directives
from app.services.offer import EXTENSIONS, refusal

router = APIRouter(prefix="/v2", tags=["kserve-v2"])


@router.get("/health/live")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready")
async def ready(health: HealthDep) -> Response:
    ok, _ = await health.readiness()
    return Response(status_code=200 if ok else 400)


@router.get("", response_class=ORJSONResponse)
async def server_metadata(admin: AdminDep) -> ORJSONResponse:
    """Exactly the extensions the gateway implements (``app.services.offer``), not Triton's."""
    triton_meta = await admin.server_metadata()
    return ORJSONResponse(
        {"name": "triton-gateway", "version": triton_meta.get("version", ""), "extensions": list(EXTENSIONS)}
    )


@router.post("/repository/index", response_class=ORJSONResponse)
async def repository_index(registry: RegistryDep) -> ORJSONResponse:
    return ORJSONResponse(await registry.index())


# --- statistics: relayed to Triton (declared before /models/{model}, which would take "stats") ---
@router.get("/models/stats", response_class=ORJSONResponse)
@router.get("/models/{model}/stats", response_class=ORJSONResponse)
@router.get("/models/{model}/versions/{version}/stats", response_class=ORJSONResponse)
async def model_statistics(admin: AdminDep, model: str = "", version: str = "") -> ORJSONResponse:
    return ORJSONResponse(await admin.model_statistics(model, version))


# --- refused on purpose (app.services.offer): a JSON error saying why, never a bare 404 ---------------
def _refuse(feature: str) -> Callable[[], Awaitable[Response]]:
    async def refused() -> Response:
        raise refusal(feature)

    return refused


for _path, _methods, _feature in (
    ("/repository/models/{model}/load", ["POST"], "model_control"),
    ("/repository/models/{model}/unload", ["POST"], "model_control"),
    ("/systemsharedmemory/status", ["GET"], "shared_memory"),
    ("/systemsharedmemory/unregister", ["POST"], "shared_memory"),
    ("/systemsharedmemory/region/{region}/status", ["GET"], "shared_memory"),
    ("/systemsharedmemory/region/{region}/register", ["POST"], "shared_memory"),
    ("/systemsharedmemory/region/{region}/unregister", ["POST"], "shared_memory"),
    ("/cudasharedmemory/status", ["GET"], "shared_memory"),
    ("/cudasharedmemory/unregister", ["POST"], "shared_memory"),
    ("/cudasharedmemory/region/{region}/status", ["GET"], "shared_memory"),
    ("/cudasharedmemory/region/{region}/register", ["POST"], "shared_memory"),
    ("/cudasharedmemory/region/{region}/unregister", ["POST"], "shared_memory"),
    ("/trace/setting", ["GET", "POST"], "trace"),
    ("/models/{model}/trace/setting", ["GET", "POST"], "trace"),
    ("/logging", ["GET", "POST"], "logging"),
):
    router.add_api_route(_path, _refuse(_feature), methods=_methods, include_in_schema=False)


@router.get("/models/{model}", response_class=ORJSONResponse)
@router.get("/models/{model}/versions/{version}", response_class=ORJSONResponse)
async def model_metadata(model: str, registry: RegistryDep, version: str | None = None) -> ORJSONResponse:
    """Every ready version listed (as Triton lists them), each addressable under ``/versions/{version}``."""
    info = await registry.resolve(model, version)
    return ORJSONResponse(info.kserve_metadata(all_versions=version is None))


@router.get("/models/{model}/ready")
@router.get("/models/{model}/versions/{version}/ready")
async def model_ready(model: str, registry: RegistryDep, version: str | None = None) -> Response:
    versions = await registry.ready_versions(model)
    ok = (version in versions) if version else bool(versions)
    return Response(status_code=200 if ok else 400)


@router.get("/models/{model}/config", response_class=ORJSONResponse)
@router.get("/models/{model}/versions/{version}/config", response_class=ORJSONResponse)
async def model_config(model: str, registry: RegistryDep, version: str | None = None) -> ORJSONResponse:
    info = await registry.resolve(model, version)
    return ORJSONResponse(info.config)


async def serve_v2(
    service: InferenceService, model: str, version: str | None, raw: bytes, headers: Headers,
    max_body_bytes: int = 8 * 1024 * 1024,
) -> Reply:  # fmt: skip
    """The /v2 infer handler (``app.pipeline.InferRouter``; documented in ``app.routers.infer``).
    ``Content-Encoding: gzip|deflate`` bodies are inflated up to ``max_body_bytes``; the answer is
    compressed when ``Accept-Encoding`` asks for it."""
    info = await service.resolve(model, version)
    raw = encoding.decode_body(raw, header_value(headers, b"content-encoding"), max_body_bytes)
    v2 = kserve.decode(info, raw, header_value(headers, kserve.HEADER_LENGTH.encode()))
    req = v2.request
    req.cache_read, req.cache_write = cache_directives(header_value(headers, b"cache-control"))
    req.request_id = current_request_id() or ""
    reply = kserve.encode(await service.infer(req), v2)
    return encoding.encode_reply(reply, header_value(headers, b"accept-encoding"))
