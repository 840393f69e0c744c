"""``Requests``: what happens once a request is answered, whichever door it came through, written once.

Every door calls it when a request ends: the HTTP pipeline (``app.frontends.http.pipeline``), the gRPC
front door (each unary RPC and each message of ``ModelStreamInfer``), and the ``/v1/ws`` socket (each
``infer`` frame, each refused frame, a refused handshake), a job worker (each attempt). It moves the
request's counter and latency histogram (HTTP: the instrumentator's
``http_requests_total{handler,method,status}`` and ``http_request_duration_seconds``; gRPC:
``tgw_grpc_requests_total{method,code}`` and ``tgw_grpc_request_duration_seconds``) and writes the one
access-log line (logger ``app.access``; health probes and scrapes at DEBUG; ``TGW_ACCESS_LOG_SAMPLE`` below 1
keeps that share of the answered requests' lines, every error's), with the same fields on
every door: request_id, method, path, status, duration_ms, and model, version and cache where the request
got that far (``RequestInfo``, filled in by the services).

A job attempt is recorded by the worker that ran it (``job``), under the job's request id and submission
path, beside the submission's own line (202). A ``/v1/ws`` frame is a request of the socket's route:
counted as ``GET /v1/ws`` (the route's method and template, as the handshake is) with the HTTP status its
answer stands for (200, or the error's status).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from prometheus_fastapi_instrumentator.metrics import Info

from app.observability import metrics, tracing
from app.observability.context import RequestInfo, begin_request

access_logger = logging.getLogger("app.access")

QUIET_PATHS = frozenset({"/metrics", "/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"})
QUIET_RPCS = frozenset({"ServerLive", "ServerReady", "ModelReady"})
GRPC_SERVICE = "inference.GRPCInferenceService"
WS_ROUTE = "/v1/ws"


Kind = Literal["http", "frame", "grpc", "job"]


class Served:
    """One request being served, whichever door: begun once when it arrives (``Requests.begin``: its start,
    its ``RequestInfo`` for the services to fill in, its SERVER span if any), ended once with its status
    (``end``): the span's status attributes, then its metric, latency and access-log line. Every door uses
    it: the HTTP pipeline per request, the gRPC door per unary call and per ``ModelStreamInfer`` message,
    the ``/v1/ws`` socket per request frame, a job worker per attempt."""

    __slots__ = ("ended", "info", "kind", "method", "path", "request_id", "requests", "span", "start")

    def __init__(
        self, requests: Requests, kind: Kind, method: str, path: str, request_id: str, span: Any = None,
        start: float | None = None,
    ) -> None:  # fmt: skip
        self.requests, self.kind, self.method, self.path = requests, kind, method, path
        self.request_id, self.span = request_id, span
        self.start = time.perf_counter() if start is None else start
        self.info = begin_request()  # the current task's (and the tasks it starts): model, version, cache
        self.ended = False

    def end(self, status: int | str, template: str | None = None, *, record: bool = True) -> None:
        """``status``: the HTTP status (int) or the gRPC status name; ``template``: an HTTP route's.
        ``record`` False: the span only (a ``ModelStreamInfer`` stream that ended OK, whose messages were
        each recorded as requests of their own)."""
        if self.ended:
            return
        self.ended = True
        elapsed = time.perf_counter() - self.start
        kind = self.kind
        if self.span is not None:
            if kind == "grpc":
                tracing.finish_rpc_span(self.span, str(status), self.request_id)
            else:
                tracing.finish_http_span(self.span, self.method, int(status), self.request_id, template)
        if not record:
            return
        rid, info, requests = self.request_id, self.info, self.requests
        if info.door is not None and requests.meter is not None:  # an inference request: usage metering
            requests.meter(info, status)
        if kind == "http":
            requests.http(rid, self.method, self.path, template, int(status), elapsed, info)
        elif kind == "grpc":
            requests.grpc(rid, self.method, str(status), elapsed, info)
        elif kind == "frame":
            requests.frame(rid, int(status), elapsed, info)
        else:
            requests.job(rid, self.path, int(status), elapsed, info)


class Requests:
    """Records finished requests. ``http_metrics``: the instrumentator's observers
    (``metrics.http_metrics()``), empty when ``TGW_METRICS_ENABLED`` is off."""

    def __init__(
        self, http_metrics: Sequence[Callable[[Info], None]] = (), access_log_sample: float = 1.0
    ) -> None:
        self.http_metrics = tuple(http_metrics)
        # Usage metering (``app.services.usage.UsageMeter.record``, set by the composition root): called
        # once per request the inference service saw, with its info and status.
        self.meter: Callable[[RequestInfo, int | str], None] | None = None
        # TGW_ACCESS_LOG_SAMPLE: a line for every ``every``-th answered request (errors: always). Evenly
        # spaced, not drawn: the lines kept stand for the same share of every route.
        self._every = 0 if access_log_sample <= 0 else max(1, round(1 / access_log_sample))
        self._answered = 0

    def _sampled(self, status: int | str) -> bool:
        """Whether a request that ended with ``status`` gets its access-log line."""
        if self._every == 1 or not (status == "OK" or (isinstance(status, int) and status < 400)):
            return True
        if self._every == 0:
            return False
        self._answered += 1
        return self._answered % self._every == 0

    def begin(
        self, kind: Kind, method: str, path: str, request_id: str, span: Any = None,
        start: float | None = None,
    ) -> Served:  # fmt: skip
        """A request arriving (see ``Served``): ``method`` is the HTTP method, or the RPC's name for gRPC;
        ``path`` the request path (a job: its submission path; gRPC and frames: unused); ``start``: when it
        arrived (``time.perf_counter()``), if before now."""
        return Served(self, kind, method, path, request_id, span, start)

    def http(
        self, request_id: str | None, method: str, path: str, template: str | None, status: int,
        duration_s: float, info: RequestInfo,
    ) -> None:  # fmt: skip
        """An HTTP request (or a ``/v1/ws`` frame); ``template``: its route's template (None: an unrouted
        path, left out of the metrics as the instrumentator does)."""
        if template is not None and self.http_metrics and template != "/metrics":
            observed = Info(None, None, method, template, str(status), duration_s)  # type: ignore[arg-type]
            for fn in self.http_metrics:
                fn(observed)
        if self._sampled(status):
            _log(request_id, method, path, status, duration_s, info, path in QUIET_PATHS)

    def frame(self, request_id: str | None, status: int, duration_s: float, info: RequestInfo) -> None:
        """One request frame of a ``/v1/ws`` socket, answered with ``status`` (200 or its error's)."""
        self.http(request_id, "GET", WS_ROUTE, WS_ROUTE, status, duration_s, info)

    def job(self, request_id: str, path: str, status: int, duration_s: float, info: RequestInfo) -> None:
        """One job attempt run by a worker (``path``: the job's submission path), answered with ``status``
        (the HTTP status its outcome stands for: 200, or its error's): ``tgw_job_runs_total{status}``,
        ``tgw_job_run_duration_seconds`` and an access-log line with method ``JOB``."""
        metrics.job_run(status, duration_s)
        if self._sampled(status):
            _log(request_id, "JOB", path, status, duration_s, info, False)

    def grpc(self, request_id: str, rpc: str, code: str, duration_s: float, info: RequestInfo) -> None:
        """A unary RPC or one ``ModelStreamInfer`` message; ``code``: the gRPC status name."""
        metrics.grpc_request(rpc, code, duration_s)
        if self._sampled(code):
            _log(request_id, "gRPC", f"/{GRPC_SERVICE}/{rpc}", code, duration_s, info, rpc in QUIET_RPCS)


def _log(
    request_id: str | None, method: str, path: str, status: int | str, duration_s: float, info: RequestInfo,
    quiet: bool,
) -> None:  # fmt: skip
    level = logging.DEBUG if quiet else logging.INFO
    if not access_logger.isEnabledFor(level):
        return
    fields: dict[str, Any] = {
        "request_id": request_id,
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(duration_s * 1000, 2),
    }
    if info.model is not None:
        fields["model"] = info.model
        fields["version"] = info.version
    if info.cache is not None:
        fields["cache"] = info.cache
    access_logger.log(level, "request", extra=fields)
