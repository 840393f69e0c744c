"""KServe v2 / Triton HTTP protocol under ``/v2``: what ``tritonclient.http`` needs, with the cache in the
inference path. Errors keep the gateway's one shape."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter
from starlette.responses import Response

from app.codecs.common import Reply
from app.errors import GatewayError
from app.frontends.http.common import Headers, ORJSONResponse, header_value
from app.frontends.http.deps import AdminDep, HealthDep, InferenceDep, RegistryDep
from app.frontends.http.routes import Params, RawRoute
from app.frontends.http.schemas import (
    V2_ERRORS,
    V2_MODEL_ERRORS,
    V2_STATS_ERRORS,
    V2IndexEntry,
    V2Live,
    V2ModelMetadata,
    V2ModelReady,
    V2Ready,
    V2ServerMetadata,
    infer_operation,
)
from app.frontends.http.sse import SSEReply, one_response
from app.frontends.kserve_http import codec as kserve
from app.frontends.kserve_http import generate
from app.request_context import RequestContext
from app.services.offer import EXTENSIONS, refusal
from app.services.statistics import ServedStatistics

if TYPE_CHECKING:
    from app.gateway import Gateway

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


@router.get("", response_class=ORJSONResponse, response_model=V2ServerMetadata, responses=V2_ERRORS)
async def server_metadata(admin: AdminDep) -> ORJSONResponse:
    """Exactly the extensions the gateway implements (``app.services.offer``), not Triton's."""
    triton_meta = await admin.server_metadata()
    return ORJSONResponse(
        {"name": "triton-gateway", "version": triton_meta.get("version", ""), "extensions": list(EXTENSIONS)}
    )


@router.post(
    "/repository/index", response_class=ORJSONResponse, response_model=list[V2IndexEntry], responses=V2_ERRORS
)
async def repository_index(registry: RegistryDep) -> ORJSONResponse:
    return ORJSONResponse(await registry.index())


# --- statistics: relayed to Triton (declared before /models/{model}, which would take "stats") ---
_STATS: dict[int | str, dict[str, Any]] = {200: {"content": {"application/json": {"schema": {
    "type": "object", "description": "Triton's inference statistics, as its HTTP API gives them",
    "properties": {"model_stats": {"type": "array", "items": {"type": "object"}}},
}}}}, **V2_STATS_ERRORS}  # fmt: skip


@router.get("/models/stats", response_class=ORJSONResponse, responses=_STATS)
@router.get("/models/{model}/stats", response_class=ORJSONResponse, responses=_STATS)
@router.get("/models/{model}/versions/{version}/stats", response_class=ORJSONResponse, responses=_STATS)
async def model_statistics(
    admin: AdminDep, inference: InferenceDep, model: str = "", version: str = ""
) -> ORJSONResponse:
    """Triton's statistics summed over its endpoints, plus the answers the gateway gave without Triton
    (``app.services.statistics``): the same on every worker, field for field as Triton writes them."""
    served = inference.served or ServedStatistics(admin, None, "")
    return ORJSONResponse(await served.answer(model, version))


# --- refused on purpose (app.services.offer): a JSON error saying why, never a bare 404 ---------------
def _refuse(feature: str) -> Callable[[], Awaitable[Response]]:
    async def refused() -> Response:
        raise refusal(feature)

    return refused


# the same five paths under /systemsharedmemory and /cudasharedmemory
_SHARED_MEMORY_PATHS = (
    ("/status", ["GET"]),
    ("/unregister", ["POST"]),
    ("/region/{region}/status", ["GET"]),
    ("/region/{region}/register", ["POST"]),
    ("/region/{region}/unregister", ["POST"]),
)

for _path, _methods, _feature in (
    ("/repository/models/{model}/load", ["POST"], "model_control"),
    ("/repository/models/{model}/unload", ["POST"], "model_control"),
    *(
        (f"/{memory}sharedmemory{path}", methods, "shared_memory")
        for memory in ("system", "cuda")
        for path, methods in _SHARED_MEMORY_PATHS
    ),
    ("/trace/setting", ["GET", "POST"], "trace"),
    ("/models/{model}/trace/setting", ["GET", "POST"], "trace"),
    ("/logging", ["GET", "POST"], "logging"),
):
    router.add_api_route(_path, _refuse(_feature), methods=_methods, include_in_schema=False)


@router.get(
    "/models/{model}",
    response_class=ORJSONResponse,
    response_model=V2ModelMetadata,
    responses=V2_MODEL_ERRORS,
)
@router.get(
    "/models/{model}/versions/{version}", response_class=ORJSONResponse, response_model=V2ModelMetadata,
    responses=V2_MODEL_ERRORS,
)  # fmt: skip
async def model_metadata(model: str, registry: RegistryDep, version: str | None = None) -> ORJSONResponse:
    """Every ready version listed (as Triton lists them), each addressable under ``/versions/{version}``."""
    info = await registry.resolve(model, version)
    return ORJSONResponse(info.kserve_metadata(all_versions=version is None))


_MODEL_NOT_READY: dict[int | str, dict[str, Any]] = {
    400: {"model": V2ModelReady, "description": "not ready"},
    **V2_MODEL_ERRORS,
}


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


_CONFIG: dict[int | str, dict[str, Any]] = {200: {"content": {"application/json": {"schema": {
    "type": "object", "description": "Triton's model configuration (model_config.proto as JSON)",
}}}}, **V2_MODEL_ERRORS}  # fmt: skip


@router.get(
    "/models/{model}/config", response_class=ORJSONResponse,
    responses=_CONFIG,
)  # fmt: skip
@router.get(
    "/models/{model}/versions/{version}/config", response_class=ORJSONResponse,
    responses=_CONFIG,
)  # fmt: skip
async def model_config(model: str, registry: RegistryDep, version: str | None = None) -> ORJSONResponse:
    info = await registry.resolve(model, version)
    return ORJSONResponse(info.config)


_HEADER_LENGTH = kserve.HEADER_LENGTH.encode()


# --- the raw routes (app.frontends.http.routes): served by the pipeline, documented from these rows ---------
async def infer_v2(gw: Gateway, params: Params, raw: bytes, headers: Headers, ctx: RequestContext) -> Reply:
    """The /v2 infer handler (this door's ``RAW_ROUTES``, served by the request pipeline).
    ``Content-Encoding: gzip|deflate`` bodies are inflated up to ``TGW_MAX_BODY_BYTES``; the answer is
    compressed when ``Accept-Encoding`` asks for it. Large bodies are decoded, and large answers written
    (and compressed), in the offload pool's child processes."""
    service, offload, max_body_bytes = gw.inference, gw.offload, gw.settings.server.max_body_bytes
    info = await service.resolve(params["model"], params.get("version"), ctx=ctx)
    coding, length = header_value(headers, b"content-encoding"), header_value(headers, _HEADER_LENGTH)
    # The JSON part is what costs (binary tensors are views of the body); a compressed body may inflate.
    json_bytes = int(length) if length is not None and length.isdigit() else len(raw)
    size = len(raw) * 64 if coding else json_bytes
    if coding:
        v2 = await offload.decode(size, kserve.decode_encoded, info, raw, coding, max_body_bytes, length)
    else:
        v2 = await offload.decode(size, kserve.decode, info, raw, length)
    response = await service.infer(v2.request, ctx)
    accept = header_value(headers, b"accept-encoding")
    cost = kserve.encode_cost(response, v2.binary_outputs, accept)
    if not offload.encodes_in_child(cost):
        return kserve.encode_answer(response, v2.id, v2.binary_outputs, accept)
    return await offload.encode(cost, kserve.encode_answer, response, v2.id, v2.binary_outputs, accept)


_V2_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string"},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
_V2_REQUEST = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"type": "string"},
        "parameters": {"type": "object"},
        "inputs": {"type": "array", "items": _V2_TENSOR},
        "outputs": {"type": "array", "items": {"type": "object"}},
    },
}
_V2_ANSWER = {
    "type": "object",
    "required": ["model_name", "outputs"],
    "properties": {
        "model_name": {"type": "string"},
        "model_version": {"type": "string"},
        "id": {"type": "string"},
        "outputs": {"type": "array", "items": _V2_TENSOR},
    },
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}


def _operation(versioned: bool) -> dict[str, Any]:
    return infer_operation(
        tag="kserve-v2", summary="KServe v2 infer" + (" (version)" if versioned else ""),
        operation_id="infer_v2" + ("_version" if versioned else ""),
        request={"requestBody": {"required": True, "content": {
            "application/json": {"schema": _V2_REQUEST}, "application/octet-stream": _BINARY,
        }}},
        answer={"application/json": {"schema": _V2_ANSWER}, "application/octet-stream": _BINARY},
        errors={400: "bad request or invalid input (names the field; KServe v2 has no 422)"}, kserve=True,
    )  # fmt: skip


# --- Triton's generate extension (app.frontends.kserve_http.generate) --------------------------------------
async def generate_v2(
    gw: Gateway, params: Params, raw: bytes, headers: Headers, ctx: RequestContext
) -> Reply:
    """``/generate``: the model's one answer as one JSON object. A model that answers once goes the unary
    way (cached, batched, single-flight); a decoupled model's stream must hold exactly one response, as
    Triton requires (200 with Triton's error otherwise; the gateway cancels the request at the second
    response where Triton lets the model run to its end)."""
    service = gw.inference
    info = await service.resolve(params["model"], params.get("version"), stream=True, ctx=ctx)
    gen = generate.decode(info, raw)
    if not info.decoupled:
        try:
            return generate.reply(await service.infer(gen.request, ctx), gen.id)
        except GatewayError as exc:
            raise generate.as_triton(exc) from None
    stream = await service.open_stream(gen.request, ctx)
    try:
        answer = None
        try:
            async for response in stream:
                if generate.is_empty_final(response):
                    continue
                if answer is not None:
                    return generate.not_one_response(stream.cache)
                answer = response
        except GatewayError as exc:
            if answer is None:  # the first item was an error: its status and message, as Triton answers it
                raise generate.as_triton(exc) from None
            return generate.not_one_response(stream.cache)
        if answer is None:
            return generate.not_one_response(stream.cache)
        return generate.reply(answer, gen.id)
    finally:
        await stream.aclose()


async def generate_stream_v2(
    gw: Gateway, params: Params, raw: bytes, headers: Headers, ctx: RequestContext
) -> SSEReply:
    """``/generate_stream``: one ``data:`` event per response (``app.frontends.http.sse``). A decoupled
    model's ``ResponseStream`` (cache replay, bounded buffering, cancellation reaching Triton when the
    client goes away); a model that answers once: its unary answer as the one event."""
    service = gw.inference
    info = await service.resolve(params["model"], params.get("version"), stream=True, ctx=ctx)
    gen = generate.decode(info, raw)
    render = generate.event_renderer(gen.id)
    if not info.decoupled:
        answer = one_response(lambda: service.infer(gen.request, ctx))
        return SSEReply(generate.triton_errors(answer), render, generate.error_event)
    stream = await service.open_stream(gen.request, ctx)
    return SSEReply(generate.triton_errors(stream), render, generate.error_event, stream=stream)


_GENERATE_REQUEST = {
    "type": "object",
    "description": "Triton's generate request: each key naming a model input is that input (a value or a "
    "flat list of values); 'parameters' (an object) is read the same way; 'id' is echoed; any other key is "
    "a request parameter (string, integer, boolean or number)",
    "properties": {"id": {"type": "string"}, "parameters": {"type": "object"}},
    "additionalProperties": True,
}
_GENERATE_ANSWER = {
    "type": "object",
    "required": ["model_name", "model_version"],
    "description": "each output by name: a value when it holds one element, else the flat list of values",
    "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                   "id": {"type": "string"}},
    "additionalProperties": True,
}  # fmt: skip
_EVENT_STREAM = {
    "text/event-stream": {
        "schema": {"type": "string", "description": "one 'data: {generate answer}' event per response; an "
                   "error as 'data: {\"error\": message, \"code\", \"details\"}'"},
    }
}  # fmt: skip


def _generate_operation(streaming: bool, versioned: bool) -> dict[str, Any]:
    name = "generate_stream" if streaming else "generate"
    op = infer_operation(
        tag="kserve-v2", summary=f"Triton {name}" + (" (version)" if versioned else ""),
        operation_id=f"{name}_v2" + ("_version" if versioned else ""),
        request={"requestBody": {"required": True, "content": {"application/json": {
            "schema": _GENERATE_REQUEST, "example": {"series": [50.0 + i for i in range(20)], "horizon": 3},
        }}}},
        answer=_EVENT_STREAM if streaming else {"application/json": {"schema": _GENERATE_ANSWER}},
        errors={400: "bad request or invalid input (names the field)"}, kserve=True,
    )  # fmt: skip
    op["responses"].pop("501", None)  # a decoupled model is served here
    return op


_GENERATE = "/v2/models/{model}/generate"
_GENERATE_VERSION = "/v2/models/{model}/versions/{version}/generate"

RAW_ROUTES = (
    RawRoute("POST", "/v2/models/{model}/infer", infer_v2, _operation(False), door="v2"),
    RawRoute("POST", "/v2/models/{model}/versions/{version}/infer", infer_v2, _operation(True), door="v2"),
    RawRoute("POST", _GENERATE, generate_v2, _generate_operation(False, False), door="v2"),
    RawRoute("POST", _GENERATE_VERSION, generate_v2, _generate_operation(False, True), door="v2"),
    RawRoute(
        "POST",
        f"{_GENERATE}_stream",
        generate_stream_v2,
        _generate_operation(True, False),
        door="v2",
        auth_class="stream",
    ),
    RawRoute(
        "POST",
        f"{_GENERATE_VERSION}_stream",
        generate_stream_v2,
        _generate_operation(True, True),
        door="v2",
        auth_class="stream",
    ),
)
