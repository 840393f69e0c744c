"""KServe v2 / Triton HTTP protocol under ``/v2``: what ``tritonclient.http`` needs, with the cache in the
inference path. Errors keep the gateway's one shape."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.responses import Response

from app.codecs import v2 as kserve
from app.codecs.common import Reply
from app.deps import AdminDep, HealthDep, RegistryDep
from app.request_context import current_request_id
from app.routers.common import Headers, ORJSONResponse
from app.routers.infer import header_value
from app.services.inference import InferenceService, cache_directives

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
    triton_meta = await admin.server_metadata()
    return ORJSONResponse(
        {
            "name": "triton-gateway",
            "version": triton_meta.get("version", ""),
            "extensions": [e for e in triton_meta.get("extensions", []) if e in _EXTENSIONS],
        }
    )


_EXTENSIONS = {"binary_tensor_data", "model_repository", "model_configuration", "parameters"}


@router.post("/repository/index", response_class=ORJSONResponse)
async def repository_index(registry: RegistryDep) -> ORJSONResponse:
    return ORJSONResponse(await registry.index())


def _metadata(info_meta: dict[str, object], version: str) -> dict[str, object]:
    def tensors(key: str) -> list[dict[str, object]]:
        items = info_meta.get(key, [])
        assert isinstance(items, list)
        return [{**t, "shape": [int(d) for d in t.get("shape", [])]} for t in items]

    return {
        "name": info_meta.get("name"),
        "versions": info_meta.get("versions", [version]),
        "platform": info_meta.get("platform", ""),
        "inputs": tensors("inputs"),
        "outputs": tensors("outputs"),
    }


@router.get("/models/{model}", response_class=ORJSONResponse)
@router.get("/models/{model}/versions/{version}", response_class=ORJSONResponse)
async def model_metadata(model: str, registry: RegistryDep, version: str | None = None) -> ORJSONResponse:
    info = await registry.resolve(model, version)
    return ORJSONResponse(_metadata(info.metadata, info.version))


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
    service: InferenceService, model: str, version: str | None, raw: bytes, headers: Headers
) -> Reply:
    """The /v2 infer handler (``app.pipeline.InferRouter``; documented in ``app.routers.infer``)."""
    info = await service.resolve(model, version)
    v2 = kserve.decode(info, raw, header_value(headers, kserve.HEADER_LENGTH.encode()))
    req = v2.request
    req.cache_read, req.cache_write = cache_directives(header_value(headers, b"cache-control"))
    req.request_id = current_request_id() or ""
    return kserve.encode(await service.infer(req), v2)
