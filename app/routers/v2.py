"""KServe v2 / Triton HTTP protocol under ``/v2``: what ``tritonclient.http`` needs, with the cache in the
inference path. Errors keep the gateway's one shape."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.codecs import v2 as kserve
from app.codecs.common import Reply
from app.deps import AdminDep, HealthDep, RegistryDep
from app.request_context import current_request_id
from app.routers.common import Headers, ORJSONResponse
from app.routers.infer import header_value
from app.routers.schemas import (
    V2IndexEntry,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
)
from app.services.inference import InferenceService, cache_directives

router = APIRouter(prefix="/v2", tags=["kserve-v2"])


# KServe v2 health and readiness answer with the status code (what tritonclient reads) and the JSON body
# the KServe spec gives them ({"live": bool}, {"ready": bool}).
_NOT_READY: dict[int | str, dict[str, Any]] = {400: {"model": V2Ready, "description": "not ready"}}


@router.get("/health/live", response_class=ORJSONResponse, response_model=V2Live)
async def live() -> ORJSONResponse:
    return ORJSONResponse({"live": True})


@router.get("/health/ready", response_class=ORJSONResponse, response_model=V2Ready, responses=_NOT_READY)
async def ready(health: HealthDep) -> ORJSONResponse:
    ok, _ = await health.readiness()
    return ORJSONResponse({"ready": ok}, status_code=200 if ok else 400)


@router.get("", response_class=ORJSONResponse, response_model=V2ServerMetadata)
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


@router.post("/repository/index", response_class=ORJSONResponse, response_model=list[V2IndexEntry])
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


@router.get("/models/{model}", response_class=ORJSONResponse, response_model=V2ModelMetadata)
@router.get(
    "/models/{model}/versions/{version}", response_class=ORJSONResponse, response_model=V2ModelMetadata
)
async def model_metadata(model: str, registry: RegistryDep, version: str | None = None) -> ORJSONResponse:
    info = await registry.resolve(model, version)
    return ORJSONResponse(_metadata(info.metadata, info.version))


_MODEL_NOT_READY: dict[int | str, dict[str, Any]] = {400: {"model": V2ModelReady, "description": "not ready"}}


@router.get(
    "/models/{model}/ready", response_class=ORJSONResponse, response_model=V2ModelReady,
    responses=_MODEL_NOT_READY,
)  # fmt: skip
@router.get(
    "/models/{model}/versions/{version}/ready", response_class=ORJSONResponse, response_model=V2ModelReady,
    responses=_MODEL_NOT_READY,
)  # fmt: skip
async def model_ready(model: str, registry: RegistryDep, version: str | None = None) -> ORJSONResponse:
    versions = await registry.ready_versions(model)
    ok = (version in versions) if version else bool(versions)
    return ORJSONResponse({"name": model, "ready": ok}, status_code=200 if ok else 400)


_CONFIG = {"type": "object", "description": "Triton's model configuration (model_config.proto as JSON)"}


@router.get(
    "/models/{model}/config", response_class=ORJSONResponse,
    responses={200: {"content": {"application/json": {"schema": _CONFIG}}}},
)  # fmt: skip
@router.get(
    "/models/{model}/versions/{version}/config", response_class=ORJSONResponse,
    responses={200: {"content": {"application/json": {"schema": _CONFIG}}}},
)  # fmt: skip
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
