"""KServe v2 / Triton HTTP protocol under ``/v2``: what ``tritonclient.http`` needs, with the cache in the
inference path. Errors keep the gateway's one shape."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.deps import HealthDep, InferenceDep, RegistryDep
from app.request_context import current_request_id
from app.routers.common import JSON, OCTET_STREAM, ORJSONResponse, Reply
from app.services.inference import InferenceService, cache_directives
from app.services.kserve import HEADER_LENGTH, parse_v2, render_v2
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
    triton_meta = await request.app.state.triton.server_metadata()
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
