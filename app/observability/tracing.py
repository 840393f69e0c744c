"""OpenTelemetry tracing, opt-in: set ``TGW_OTEL_ENDPOINT`` (OTLP/gRPC, e.g. ``http://otel-collector:4317``)
and install the extra ``pip install 'triton-gateway[otel]'``.

Spans: one SERVER span per HTTP request (``POST /v1/models/{model}/infer``; W3C ``traceparent`` from the
caller is honoured), children ``cache.get``, ``cache.put`` and ``triton.infer``; the Triton call carries
``traceparent`` as gRPC metadata so Triton's own trace (``--trace-config mode=opentelemetry``) joins it.

Disabled (the default), nothing from ``opentelemetry`` is imported and ``span()`` returns a shared no-op
context manager: the cost is one global read per call site.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import Any

from starlette.types import Scope

logger = logging.getLogger(__name__)

_tracer: Any = None
_provider: Any = None
_NULL: AbstractContextManager[None] = contextlib.nullcontext()


class TracingUnavailable(RuntimeError):
    pass


def enabled() -> bool:
    return _tracer is not None


def setup_tracing(endpoint: str | None, service_name: str = "triton-gateway", exporter: Any = None) -> bool:
    """Start tracing to ``endpoint`` (or to ``exporter``, for tests, exported synchronously).
    Returns whether tracing is on."""
    global _tracer, _provider
    if endpoint is None and exporter is None:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError as exc:
        raise TracingUnavailable(
            "TGW_OTEL_ENDPOINT is set but OpenTelemetry is not installed: pip install 'triton-gateway[otel]'"
        ) from exc
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        insecure = not str(endpoint).startswith("https://")
        otlp = OTLPSpanExporter(endpoint=endpoint, insecure=insecure)
        provider.add_span_processor(BatchSpanProcessor(otlp))
    shutdown_tracing()
    _provider = provider
    _tracer = provider.get_tracer("app")
    logger.info("tracing on: OTLP to %s", endpoint or type(exporter).__name__)
    return True


def shutdown_tracing() -> None:
    """Flush and stop (at shutdown); tracing is off afterwards."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def span(name: str, attributes: dict[str, Any] | None = None) -> AbstractContextManager[Any]:
    """A child span of the current one; a no-op when tracing is off."""
    if _tracer is None:
        return _NULL
    cm: AbstractContextManager[Any] = _tracer.start_as_current_span(name, attributes=attributes)
    return cm


def inject(carrier: MutableMapping[str, str]) -> None:
    """Add ``traceparent`` (and ``tracestate``) for the current span to outgoing headers / gRPC metadata."""
    if _tracer is None:
        return
    from opentelemetry.propagate import inject as otel_inject

    otel_inject(carrier)


@contextlib.contextmanager
def server_span(scope: Scope) -> Iterator[Any]:
    """The SERVER span of one HTTP request; its status is set when the request ends (``finish_http_span``,
    called by ``app.observability.requests.Served.end``)."""
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())}
    method = scope.get("method", "GET")
    attrs = {"http.request.method": method, "url.path": scope.get("path", "")}
    with _tracer.start_as_current_span(
        f"{method} {scope.get('path', '')}", context=extract(headers), kind=SpanKind.SERVER, attributes=attrs
    ) as current:
        yield current


@contextlib.contextmanager
def rpc_server_span(service: str, method: str, metadata: Mapping[str, str]) -> Iterator[Any]:
    """The SERVER span of one gRPC call (``traceparent`` from the call metadata is honoured); ``None``
    when tracing is off."""
    if _tracer is None:
        yield None
        return
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    attrs = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    with _tracer.start_as_current_span(
        f"{service}/{method}", context=extract(dict(metadata)), kind=SpanKind.SERVER, attributes=attrs
    ) as current:
        yield current


def finish_http_span(
    current: Any, method: str, status: int, request_id: str | None, template: str | None = None
) -> None:
    """An HTTP SERVER span's status attributes (named after its route template when known)."""
    from opentelemetry.trace import Status, StatusCode

    if template:
        current.update_name(f"{method} {template}")
        current.set_attribute("http.route", template)
    current.set_attribute("http.response.status_code", status)
    if request_id:
        current.set_attribute("tgw.request_id", request_id)
    if status >= 500:
        current.set_status(Status(StatusCode.ERROR))


def finish_rpc_span(current: Any, code: str, request_id: str | None) -> None:
    """A gRPC SERVER span's status attributes (``code``: the gRPC status name)."""
    import grpc

    current.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
    if request_id:
        current.set_attribute("tgw.request_id", request_id)
