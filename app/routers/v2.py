"""KServe v2 / Triton HTTP protocol under ``/v2``: what ``tritonclient.http`` needs, with the cache in the
inference path. Errors keep the gateway's one shape."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.deps import HealthDep, InferenceDep, RegistryDep
from app.request_context import current_request_id
from app.routers.common import JSON, OCTET_STREAM, ORJSONResponse, Reply
from app.services.inference import InferenceService, cache_directives
from app.services.kserve import HEADER_LENGTH, parse_v2, render_v2
from app.services.offer import EXTENSIONS, refusal
from app.services.registry import ModelRegistry

router = APIRouter(prefix="/v2", tags=["kserve-v2"])


@router.get("/health/live")
async def live() -> Response:
    return Response(status_code=200)


@router.get("/health/ready")
async def ready(health: HealthDep) -> Response:
    ok, _ = await health.readiness()
    return Response(status_code=200 if ok else 400)


@router.get("", response_class=ORJSONResponse)
async def server_metadata(request: Request) -> ORJSONResponse:
    """Exactly the extensions the gateway implements (``app.services.offer``), not Triton's."""
    triton_meta = await request.app.state.triton.server_metadata()
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
async def model_statistics(request: Request, model: str = "", version: str = "") -> ORJSONResponse:
    return ORJSONResponse(await request.app.state.triton.model_statistics(model, version))


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
    """Every ready version listed, each addressable under ``/versions/{version}``."""
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


@router.post("/models/{model}/infer")
@router.post("/models/{model}/versions/{version}/infer")
async def infer(
    model: str, request: Request, service: InferenceDep, registry: RegistryDep, version: str | None = None
) -> Response:
    headers = request.headers
    reply = await serve_v2(
        service, registry, await request.body(), headers.get("cache-control"), headers.get(HEADER_LENGTH),
        model, version,
    )  # fmt: skip
    return reply.response()


async def serve_v2(
    service: InferenceService, registry: ModelRegistry, raw: bytes, cache_control: str | None,
    header_length_in: str | None, model: str, version: str | None,
) -> Reply:  # fmt: skip
    """The /v2 infer handler, shared by the route above and ``app.hotpath``."""
    info = await registry.resolve(model, version)
    v2 = parse_v2(info, raw, header_length_in)
    v2.request.cache_read, v2.request.cache_write = cache_directives(cache_control)
    response = await service.infer(v2.request, current_request_id() or "")
    body, header_length = render_v2(response, v2)
    x_cache = (b"x-cache", response.cache.encode())
    if header_length is None:
        return Reply(200, body, JSON, (x_cache,))
    return Reply(200, body, OCTET_STREAM, (x_cache, (HEADER_LENGTH.encode(), str(header_length).encode())))
