"""``POST /v1/models/{model}[/versions/{version}]/infer``: JSON in, JSON out, ``X-Cache`` header;
``POST /v1/models/{model}[/versions/{version}]/stream``: the same body in, server-sent events out (one per
response of a decoupled model; ``X-Cache`` too).

Served by the request pipeline (``app.frontends.http.pipeline``), not by a FastAPI route: ``RAW_ROUTES``
are this door's rows of the raw route table (``app.frontends.http.routes``: matcher, handler, metric
template, auth class, OpenAPI operation); ``infer_v1`` is the transport-neutral handler."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from app.codecs.common import Reply, json_values
from app.frontends.http.common import Headers
from app.frontends.http.routes import Params, RawRoute
from app.frontends.http.schemas import INFER_BODY_PROPERTIES, InferResult, body_doc, infer_operation
from app.frontends.http.sse import SSEReply, one_response
from app.frontends.rest import codec as v1
from app.request_context import RequestContext

if TYPE_CHECKING:
    from app.gateway import Gateway

__all__ = ["RAW_ROUTES", "Reply", "infer_v1", "stream_v1"]


# --- the raw routes (app.frontends.http.routes): served by the pipeline, documented from these rows ---------
async def infer_v1(gw: Gateway, params: Params, body: bytes, headers: Headers, ctx: RequestContext) -> Reply:
    """The ``/v1`` infer handler. Large bodies are decoded, and large answers written, in the gateway's
    offload pool's child processes."""
    service, offload = gw.inference, gw.offload
    info = await service.resolve(params["model"], params.get("version"), ctx=ctx)
    req = await offload.decode(len(body), v1.decode, info, body)
    response = await service.infer(req, ctx)
    values = json_values(response.result.outputs)
    if not offload.encodes_in_child(values):
        return v1.encode(response)
    return await offload.encode(values, v1.encode, response)


async def stream_v1(
    gw: Gateway, params: Params, body: bytes, headers: Headers, ctx: RequestContext
) -> SSEReply:
    """The ``/v1`` stream handler: the /v1 request body, answered as server-sent events
    (``app.frontends.http.sse``), one per response. A decoupled model's ``ResponseStream`` (cache replay,
    bounded buffering, cancellation reaching Triton when the client goes away); a model that answers once:
    its unary answer as the one event (``final`` true)."""
    service, offload = gw.inference, gw.offload
    info = await service.resolve(params["model"], params.get("version"), stream=True, ctx=ctx)
    req = await offload.decode(len(body), v1.decode, info, body)
    if not info.decoupled:
        return SSEReply(one_response(lambda: service.infer(req, ctx)), v1.stream_event, v1.error_event)
    stream = await service.open_stream(req, ctx)
    return SSEReply(stream, v1.stream_event, v1.error_event, stream=stream)


_V1_ANSWER = InferResult.model_json_schema()
_V1_EVENTS = {
    "text/event-stream": {
        "schema": {"type": "string", "description": "one 'data: {model, model_version, outputs, final, seq}' "
                   "event per response; an error as 'event: error' with 'data: {\"error\": {code, message, "
                   "details}}'"},
    }
}  # fmt: skip


def _operation(versioned: bool) -> dict[str, Any]:
    return infer_operation(
        tag="inference", summary="Infer" + (" (version)" if versioned else ""),
        operation_id="infer_v1" + ("_version" if versioned else ""),
        request=body_doc(INFER_BODY_PROPERTIES, {"inputs": {"series": [[[0.0]] * 20]}}),
        answer={"application/json": {"schema": _V1_ANSWER}}, codes=(422,),
    )  # fmt: skip


def _stream_operation(versioned: bool) -> dict[str, Any]:
    op = infer_operation(
        tag="inference", summary="Stream (server-sent events)" + (" (version)" if versioned else ""),
        operation_id="stream_v1" + ("_version" if versioned else ""),
        request=body_doc(INFER_BODY_PROPERTIES, {"inputs": {"series": [50.0 + i for i in range(20)],
                                                            "horizon": [3]}}),
        answer=_V1_EVENTS, codes=(422,),
    )  # fmt: skip
    op["responses"].pop("501", None)  # a decoupled model is served here
    return op


RAW_ROUTES = (
    RawRoute("POST", "/v1/models/{model}/infer", infer_v1, _operation(False)),
    RawRoute("POST", "/v1/models/{model}/versions/{version}/infer", infer_v1, _operation(True)),
    RawRoute("POST", "/v1/models/{model}/stream", stream_v1, _stream_operation(False), auth_class="stream"),
    RawRoute(
        "POST",
        "/v1/models/{model}/versions/{version}/stream",
        stream_v1,
        _stream_operation(True),
        auth_class="stream",
    ),
)
