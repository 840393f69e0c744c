"""The doors agree (issue 21, item 8): the same cases through every front door of the gateway give the
same error, each rendered its protocol's way, are counted in the request metrics with the same label
scheme, and leave one access-log line with the same fields.

Doors: ``/v1`` infer, ``/v2`` infer with a JSON body, ``/v2`` infer with the binary tensor extension
(``Inference-Header-Content-Length``), gRPC ``ModelInfer``, gRPC ``ModelStreamInfer``, an ``infer`` frame
on ``/v1/ws``, and a job (``POST /v1/models/{m}/jobs``, then the job's outcome).

Each case names its outcome ONCE, as the domain error code (``app.errors`` and ``app.auth``: e.g.
``model_not_found``; None for a success); what each door must answer is derived from the project's own
tables (``expected``): the error class's HTTP status (``GatewayError.status_code``), ``kserve_status``
under ``/v2``, ``HTTP_TO_GRPC`` for gRPC (app/frontends/grpc/status.py). Renderings:

* HTTP doors: the status and ``{"error": {"code", ...}}`` (under ``/v2`` the KServe shape, ``code`` beside
  ``error``);
* gRPC unary: the status code (gRPC carries no domain code, so the table's status is what must agree);
* gRPC stream: a message's ``infer_response.parameters["status"]`` (beside ``error_message``), or the
  stream's own status for what refuses the whole stream (a missing or revoked key, an oversized message);
* ``/v1/ws``: an error frame ``{"type": "error", "error": {"code", ...}}``; what the socket's key decides
  (missing, revoked) refuses the handshake instead, with the HTTP status and error JSON;
* job: the submission's answer (4xx/5xx JSON), or, for what fails only when the job runs (the deadline),
  202 and the finished job's ``error``; the attempt that failed is then the request counted
  (``tgw_job_runs_total{status}``) and logged (a ``JOB`` line under the submission's path and id).

One send per (door, case), cached (``Doors.outcome``); four aspects are checked of it, one test each:
``test_same_error`` (rendering), ``test_request_id`` (the answer carries the request id: the client's
when sane, else a generated sane one), ``test_counted_in_metrics`` and ``test_access_log_line``. Where
the doors disagree today the (aspect, door, case) cell is in ``DISAGREE`` and marked
``xfail(strict=True)`` with what differs: the test passes today, turns red when a difference is fixed
without updating the table, and the table documents every difference.

Gateways: one with keys required (``TGW_AUTH=required``), small body limits, a 1 s Triton deadline and an
in-process job worker with one attempt per job (``main``); one pointed at a closed Triton port
(``down``). Both run in this process, so ``prometheus_client``'s registry holds their metrics and the
``app.access`` logger their access lines.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2, service_pb2_grpc
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from app.auth.principal import TooManyRequests, Unauthorized
from app.errors import (
    InvalidInput,
    ModelNotFound,
    NotOffered,
    PayloadTooLarge,
    UpstreamTimeout,
    UpstreamUnavailable,
    kserve_status,
)
from app.frontends.grpc.status import HTTP_TO_GRPC
from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port
from tests.gateway_server import GatewayAddresses, running_gateway_addresses
from tests.integration.servers import running_redis
from tests.integration.test_auth import ADMIN, auth_settings, bearer, make_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

SANE_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")  # app.request_context._VALID_ID
BAD_ID = "bad id " + "x" * 300  # a space, and longer than 128: never used as given
LIMIT = 1024  # every body limit of the main gateway (the settings' minimum)
DEADLINE_S = 1.0  # the main gateway's TGW_TRITON_TIMEOUT_S
SLEEP_S = 3.0  # what sleep_fp32 is asked to sleep in the deadline case
GRPC_SERVICE = "/inference.GRPCInferenceService/"

# The domain errors of the cases and their HTTP status: the project's classes, not numbers written here.
HTTP_STATUS: dict[str, int] = {
    cls.code: cls.status_code
    for cls in (ModelNotFound, InvalidInput, NotOffered, Unauthorized, TooManyRequests, PayloadTooLarge,
                UpstreamUnavailable, UpstreamTimeout)
}  # fmt: skip

DOORS = ("v1", "v2_json", "v2_binary", "grpc_unary", "grpc_stream", "ws", "job")
HTTP_DOORS = ("v1", "v2_json", "v2_binary", "job")


# --- the cases -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tensor:
    """One input: ``array`` with ``datatype`` for the doors that name a datatype (/v2, gRPC); ``v1``
    overrides the nested list the JSON doors (/v1, /v1/ws, jobs) send, which have no datatype field (a
    bad datatype there is values of another kind)."""

    name: str
    datatype: str
    array: np.ndarray
    v1: Any = None

    def nested(self) -> Any:
        return self.v1 if self.v1 is not None else self.array.tolist()


def fp32(*shape: int, value: float = 1.0) -> np.ndarray:
    return np.full(shape, value, np.float32)


OK_INPUT = Tensor("INPUT0", "FP32", np.array([[1.0, 2.0]], np.float32))


@dataclass(frozen=True)
class Case:
    name: str
    code: str | None  # the domain error every door gives; None: a success
    model: str = "identity_fp32"
    version: str | None = None
    tensor: Tensor = OK_INPUT
    gateway: str = "main"  # main (keys required, small limits, short deadline) or down (Triton closed)
    key: str = "good"  # good, none, revoked, limited (a fresh key whose one request is spent)
    request_id: str | None = None  # None: a sane id of the test's own
    connection: bool = False  # refused when a socket or stream opens (its key), not per message
    at_run_time: bool = False  # a job fails only when it runs (submitted 202 first)


CASES = (
    Case("unknown_model", "model_not_found", model="no_such_model"),
    Case("unknown_version", "model_not_found", model="versioned_fp32", version="9"),
    Case("bad_shape", "invalid_input", tensor=Tensor("INPUT0", "FP32", fp32(2))),
    Case("bad_datatype", "invalid_input",
         tensor=Tensor("INPUT0", "INT32", np.array([[1, 2]], np.int32), v1=[["a", "b"]])),
    Case("decoupled_on_unary", "not_offered", model="repeat_decoupled",
         tensor=Tensor("COUNT", "INT32", np.array([2], np.int32))),
    Case("invalid_request_id", None, request_id=BAD_ID),
    Case("missing_key", "unauthorized", key="none", connection=True),
    Case("revoked_key", "unauthorized", key="revoked", connection=True),
    Case("rate_limited", "rate_limited", key="limited"),
    Case("over_body_limit", "payload_too_large", tensor=Tensor("INPUT0", "FP32", fp32(1, 1000))),
    Case("triton_down", "triton_unavailable", gateway="down"),
    Case("deadline", "triton_timeout", model="sleep_fp32", at_run_time=True,
         tensor=Tensor("DELAY_S", "FP32", fp32(1, 1, value=SLEEP_S))),
)  # fmt: skip
CASE = {c.name: c for c in CASES}


def expected_code(door: str, case: Case) -> str | None:
    # A decoupled model is exactly what ModelStreamInfer and /v1/ws stream, and a job runs it as a stream
    # (its submission is accepted): there the case is a success.
    return None if door in ("grpc_stream", "ws", "job") and case.name == "decoupled_on_unary" else case.code


def http_rendering(door: str, case: Case) -> int | str:
    """The status this door's metrics label and access-log line carry for the case: the HTTP status
    (under /v2 as KServe renders it; a job's submission is 202; a WebSocket, with no status of its own,
    the HTTP status of the error) or the gRPC status name."""
    code = expected_code(door, case)
    if door in ("grpc_unary", "grpc_stream"):
        return "OK" if code is None else HTTP_TO_GRPC[HTTP_STATUS[code]].name
    if code is None:
        return 202 if door == "job" else 200
    status = HTTP_STATUS[code]
    return kserve_status(status) if door.startswith("v2") else status


def expected(door: str, case: Case) -> tuple[int | str | None, str | None]:
    """(status, code) of the door's answer: see the module docstring for each rendering."""
    code = expected_code(door, case)
    status = http_rendering(door, case)
    if door in ("grpc_unary", "grpc_stream"):
        return status, None  # gRPC carries the status only: the table's status must agree
    if door == "ws":
        return (status, code) if case.connection and code is not None else (None, code)
    if door == "job" and case.at_run_time:
        return 202, code  # accepted; the finished job's error says what happened
    return status, code


# --- where the doors disagree: (aspect, door, case or "*") -> what differs (none today; a difference found
# later is written here, marked xfail(strict=True), until it is fixed) -------------------------------------
DISAGREE: dict[tuple[str, str, str], str] = {}


def cells(aspect: str) -> list[Any]:
    params = []
    for case in CASES:
        for door in DOORS:
            reason = DISAGREE.get((aspect, door, case.name)) or DISAGREE.get((aspect, door, "*"))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(door, case, id=f"{case.name}-{door}", marks=marks))
    return params


# --- what a door answered ------------------------------------------------------------------------------
Counts = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Answer:
    status: int | str | None  # HTTP status, gRPC status name, or None (a frame; see expected())
    code: str | None  # the domain code the answer carries (gRPC: none)
    request_id: str | None  # the id the answer carries back (None: it carries none)
    detail: str = ""


@dataclass
class Outcome:
    answer: Answer
    sent_id: str
    lines: list[dict[str, Any]] = field(default_factory=list)  # access-log lines of the door's path
    counted: Counts = field(default_factory=dict)  # request counters that moved, by how much


def request_counts() -> Counts:
    """``http_requests_total`` (the instrumentator's, observed by the pipeline),
    ``tgw_grpc_requests_total`` (the gRPC front door's) and ``tgw_job_runs_total`` (the job workers'), every
    labelled sample."""
    counts: Counts = {}
    for family in REGISTRY.collect():
        if family.name in ("http_requests", "tgw_grpc_requests", "tgw_job_runs"):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return counts


_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class AccessLines(logging.Handler):
    """The ``app.access`` records, as the fields the JSON log line gets (``extra=``)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        fields = {
            k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")
        }
        self.lines.append(fields)


def http_answer(r: httpx.Response) -> Answer:
    code = None
    if r.status_code >= 400:
        body = r.json()
        error = body.get("error")
        code = error.get("code") if isinstance(error, dict) else body.get("code")  # KServe shape under /v2
    return Answer(r.status_code, code, r.headers.get("x-request-id"), r.text[:300])


def infer_path(api: str, case: Case, what: str = "infer") -> str:
    version = f"/versions/{case.version}" if case.version else ""
    return f"/{api}/models/{case.model}{version}/{what}"


def template(api: str, case: Case, what: str = "infer") -> str:
    return f"/{api}/models/{{model}}" + ("/versions/{version}" if case.version else "") + f"/{what}"


def door_path(door: str, case: Case) -> str:
    return {
        "v1": infer_path("v1", case), "v2_json": infer_path("v2", case), "v2_binary": infer_path("v2", case),
        "grpc_unary": GRPC_SERVICE + "ModelInfer", "grpc_stream": GRPC_SERVICE + "ModelStreamInfer",
        "ws": "/v1/ws", "job": infer_path("v1", case, "jobs"),
    }[door]  # fmt: skip


def v2_tensor(t: Tensor) -> dict[str, Any]:
    return {"name": t.name, "shape": list(t.array.shape), "datatype": t.datatype}


def rpc_failure(exc: grpc.RpcError) -> Answer:
    """A failed call's status and its ``x-request-id`` trailing metadata (a failed call is a grpc.Call)."""
    call = cast(grpc.Call, exc)
    trailing = dict(call.trailing_metadata() or ())
    return Answer(call.code().name, None, trailing.get("x-request-id"), call.details() or "")


def grpc_request(case: Case, rid: str) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name=case.model, model_version=case.version or "", id=rid)
    t = case.tensor
    req.inputs.add(name=t.name, datatype=t.datatype, shape=list(t.array.shape))
    req.raw_input_contents.append(t.array.tobytes())
    return req


# --- the doors -----------------------------------------------------------------------------------------
class Doors:
    def __init__(self, main: GatewayAddresses, down: GatewayAddresses, lines: AccessLines) -> None:
        self.gateways = {"main": main, "down": down}
        self.access = lines
        self.good = make_key(main.http, rps=1000, burst=1000)
        self.revoked = make_key(main.http)
        r = httpx.delete(f"{main.http}/v1/admin/keys/{self.revoked['id']}", headers={"X-API-Key": ADMIN})
        assert r.status_code == 200, r.text
        self.outcomes: dict[tuple[str, str], Outcome] = {}
        self.adapters: dict[str, Callable[[GatewayAddresses, Case, dict[str, str], str], Answer]] = {
            "v1": self.v1, "v2_json": self.v2_json, "v2_binary": self.v2_binary,
            "grpc_unary": self.grpc_unary, "grpc_stream": self.grpc_stream, "ws": self.ws, "job": self.job,
        }  # fmt: skip

    def outcome(self, door: str, case: Case) -> Outcome:
        if (door, case.name) not in self.outcomes:
            self.outcomes[(door, case.name)] = self._send(door, case)
        return self.outcomes[(door, case.name)]

    def _send(self, door: str, case: Case) -> Outcome:
        gateway = self.gateways[case.gateway]
        credential = self._credential(door, case, gateway)
        rid = case.request_id or f"doors.{door}.{case.name}.{time.time_ns()}"
        before = request_counts()
        self.access.lines.clear()
        answer = self.adapters[door](gateway, case, credential, rid)
        path = door_path(door, case)
        # a job's submission is a POST line; the attempt a worker ran, a JOB line (the one that failed)
        method = ("JOB" if case.at_run_time else "POST") if door == "job" else None

        def ours(line: dict[str, Any]) -> bool:
            return line.get("path") == path and (method is None or line.get("method") == method)

        deadline = time.monotonic() + 0.5  # written as (HTTP) or just before (gRPC) the answer goes out
        while not any(ours(line) for line in self.access.lines) and time.monotonic() < deadline:
            time.sleep(0.02)
        lines = [line for line in list(self.access.lines) if ours(line)]
        after = request_counts()
        counted = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k, 0.0)}
        return Outcome(answer, rid, lines, counted)

    def _credential(self, door: str, case: Case, gateway: GatewayAddresses) -> dict[str, str]:
        if case.gateway == "down" or case.key == "none":
            return {}  # the closed-Triton gateway runs without keys
        if case.key == "revoked":
            return bearer(self.revoked)
        if case.key == "limited":
            # One request per ~16 minutes, burst 1: the first request takes it, the case's is refused. A
            # socket or stream takes one request when it opens, so there the case's message is refused;
            # elsewhere the one request is spent first.
            key = make_key(gateway.http, rps=0.001, burst=1)
            if door not in ("ws", "grpc_stream"):
                assert httpx.get(gateway.http + "/v1/models", headers=bearer(key)).status_code == 200
            return bearer(key)
        return bearer(self.good)

    # HTTP doors
    def v1(self, gw: GatewayAddresses, case: Case, cred: dict[str, str], rid: str) -> Answer:
        body = json.dumps({"inputs": {case.tensor.name: case.tensor.nested()}})
        headers = {**cred, "X-Request-ID": rid, "Content-Type": "application/json"}
        return http_answer(
            httpx.post(gw.http + infer_path("v1", case), content=body, headers=headers, timeout=30)
        )

    def v2_json(self, gw: GatewayAddresses, case: Case, cred: dict[str, str], rid: str) -> Answer:
        t = case.tensor
        body = json.dumps({"inputs": [{**v2_tensor(t), "data": t.array.reshape(-1).tolist()}]})
        headers = {**cred, "X-Request-ID": rid, "Content-Type": "application/json"}
        return http_answer(
            httpx.post(gw.http + infer_path("v2", case), content=body, headers=headers, timeout=30)
        )

    def v2_binary(self, gw: GatewayAddresses, case: Case, cred: dict[str, str], rid: str) -> Answer:
        t = case.tensor
        blob = t.array.tobytes()
        header = json.dumps({"inputs": [{**v2_tensor(t), "parameters": {"binary_data_size": len(blob)}}]})
        headers = {**cred, "X-Request-ID": rid, "Content-Type": "application/octet-stream",
                   "Inference-Header-Content-Length": str(len(header))}  # fmt: skip
        r = httpx.post(
            gw.http + infer_path("v2", case), content=header.encode() + blob, headers=headers, timeout=30
        )
        return http_answer(r)

    def job(self, gw: GatewayAddresses, case: Case, cred: dict[str, str], rid: str) -> Answer:
        body = json.dumps({"inputs": {case.tensor.name: case.tensor.nested()}})
        headers = {**cred, "X-Request-ID": rid, "Content-Type": "application/json"}
        r = httpx.post(gw.http + infer_path("v1", case, "jobs"), content=body, headers=headers, timeout=30)
        submitted = http_answer(r)
        if r.status_code != 202:
            return submitted
        deadline = time.monotonic() + 30
        while True:
            job = httpx.get(f"{gw.http}/v1/jobs/{r.json()['id']}", headers=cred, timeout=10).json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            assert time.monotonic() < deadline, job
            time.sleep(0.05)
        error = job.get("error") or {}
        return Answer(202, error.get("code"), submitted.request_id, json.dumps(job)[:300])

    # gRPC doors
    @staticmethod
    def _metadata(cred: dict[str, str], rid: str) -> list[tuple[str, str]]:
        return [("x-request-id", rid), *((k.lower(), v) for k, v in cred.items())]

    def grpc_unary(self, gw: GatewayAddresses, case: Case, cred: dict[str, str], rid: str) -> Answer:
        with grpc.insecure_channel(gw.grpc) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            metadata = self._metadata(cred, rid)
            try:
                _, call = stub.ModelInfer.with_call(grpc_request(case, rid), metadata=metadata, timeout=30)
            except grpc.RpcError as exc:
                return rpc_failure(exc)
            trailing = dict(call.trailing_metadata() or ())
            return Answer("OK", None, trailing.get("x-request-id"))

    def grpc_stream(self, gw: GatewayAddresses, case: Case, cred: dict[str, str], rid: str) -> Answer:
        """The stream's status, or a message's (``parameters["status"]``); the id: the stream's
        ``x-request-id`` trailing metadata if any, else the response's ``id`` (the message's own id
        echoed, which is also the Triton request id when sane)."""
        with grpc.insecure_channel(gw.grpc) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelStreamInfer(iter([grpc_request(case, rid)]), metadata=self._metadata(cred, rid),
                                         timeout=30)  # fmt: skip
            responses = []
            try:
                responses.extend(call)
            except grpc.RpcError as exc:
                return rpc_failure(exc)
            trailing = dict(call.trailing_metadata() or ())
        status, detail = "OK", ""
        for response in responses:
            if response.error_message:
                status = response.infer_response.parameters["status"].string_param
                detail = response.error_message
        assert responses, "the stream answered nothing"
        echoed = responses[0].infer_response.id or None
        return Answer(status, None, trailing.get("x-request-id", echoed), detail)

    # /v1/ws
    def ws(self, gw: GatewayAddresses, case: Case, cred: dict[str, str], rid: str) -> Answer:
        """The frame's ``ref`` is the client's own, echoed; the answer's ``request_id`` is the id the
        request was served under (the ``ref`` when sane, as X-Request-ID is, else a generated one). A refused
        handshake carries the X-Request-ID response header."""
        frame: dict[str, Any] = {"op": "infer", "ref": rid, "model": case.model,
                                 "inputs": {case.tensor.name: case.tensor.nested()}}  # fmt: skip
        if case.version:
            frame["version"] = case.version
        url = gw.http.replace("http", "ws", 1) + "/v1/ws"
        try:
            with connect(url, additional_headers={**cred, "X-Request-ID": rid}, open_timeout=10) as socket:
                socket.send(json.dumps(frame))
                while True:
                    answer = json.loads(socket.recv(timeout=30))
                    if answer["type"] in ("result", "error") or (
                        answer["type"] == "stream" and answer["final"]
                    ):
                        break
        except InvalidStatus as exc:
            response = exc.response
            error = json.loads(response.body or b"{}").get("error", {})
            return Answer(response.status_code, error.get("code"), response.headers.get("x-request-id"))
        code = answer["error"]["code"] if answer["type"] == "error" else None
        return Answer(None, code, answer.get("request_id"), json.dumps(answer)[:300])


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    """This module's Redis: its in-process job worker (1 s deadline, one attempt) must never take the jobs
    other test modules leave in the session's shared Redis."""
    with running_redis(tmp_path_factory, "doors_redis") as server:
        yield server


@pytest.fixture(scope="module")
def doors(triton: EmbeddedTriton, own_redis: EmbeddedRedis) -> Iterator[Doors]:
    redis_server = own_redis
    main_settings = auth_settings(
        triton, redis_server.url,
        max_body_bytes=LIMIT, grpc_max_message_bytes=LIMIT, job_max_body_bytes=LIMIT,
        ws_max_frame_bytes=LIMIT, triton_timeout_s=DEADLINE_S, worker_in_process=True, job_max_attempts=1,
        auth_failed_per_minute=10_000, auth_ws_per_key=100,
    )  # fmt: skip
    down_settings = {"triton_url": f"127.0.0.1:{free_port()}", "redis_url": redis_server.url,
                     "triton_retries": 0}  # fmt: skip
    access = logging.getLogger("app.access")
    level = access.level
    lines = AccessLines()
    with (
        running_gateway_addresses(**main_settings) as main,
        running_gateway_addresses(**down_settings) as down,
    ):
        access.setLevel(logging.INFO)  # the test gateways run with the root logger at WARNING
        access.addHandler(lines)
        try:
            yield Doors(main, down, lines)
        finally:
            access.removeHandler(lines)
            access.setLevel(level)


# --- the aspects ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("door", "case"), cells("error"))
def test_same_error(doors: Doors, door: str, case: Case) -> None:
    """Every door gives the case's domain error, rendered its way (``expected``)."""
    answer = doors.outcome(door, case).answer
    assert (answer.status, answer.code) == expected(door, case), answer.detail


@pytest.mark.parametrize(("door", "case"), cells("request_id"))
def test_request_id(doors: Doors, door: str, case: Case) -> None:
    """The answer carries the request id back: the client's when sane, else a generated sane one."""
    out = doors.outcome(door, case)
    if SANE_ID.match(out.sent_id):
        assert out.answer.request_id == out.sent_id, out.answer
    else:
        assert out.answer.request_id is not None and SANE_ID.match(out.answer.request_id), out.answer
        assert out.answer.request_id != out.sent_id


def expected_count(door: str, case: Case) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The request counter (and labels) the door's answer must move by one: ``http_requests_total``
    with the route template and the HTTP status, ``tgw_grpc_requests_total`` with the RPC and the gRPC
    status. (Neither labels the domain code: a 404 is model_not_found or not_found alike.)"""
    status = str(http_rendering(door, case))
    if door == "job" and case.at_run_time:  # the attempt that failed: the worker's request
        return "tgw_job_runs_total", (("status", status),)
    if door in ("grpc_unary", "grpc_stream"):
        labels = {"method": "ModelInfer" if door == "grpc_unary" else "ModelStreamInfer", "code": status}
        return "tgw_grpc_requests_total", tuple(sorted(labels.items()))
    handler = {"v1": template("v1", case), "v2_json": template("v2", case), "v2_binary": template("v2", case),
               "job": template("v1", case, "jobs"), "ws": "/v1/ws"}[door]  # fmt: skip
    labels = {"handler": handler, "method": "GET" if door == "ws" else "POST", "status": status}
    return "http_requests_total", tuple(sorted(labels.items()))


@pytest.mark.parametrize(("door", "case"), cells("metrics"))
def test_counted_in_metrics(doors: Doors, door: str, case: Case) -> None:
    out = doors.outcome(door, case)
    want = expected_count(door, case)
    assert out.counted.get(want) == 1.0, f"want {want}; moved: {out.counted}"


@pytest.mark.parametrize(("door", "case"), cells("access_log"))
def test_access_log_line(doors: Doors, door: str, case: Case) -> None:
    """One access-log line, with the same fields as /v1's for the case, and the door's status."""
    out = doors.outcome(door, case)
    # the reference: /v1's line for the case, or for a success where this door succeeds (the stream and a
    # decoupled model) /v1's line of the success case
    same = expected_code(door, case) == expected_code("v1", case)
    [reference] = doors.outcome("v1", case if same else CASE["invalid_request_id"]).lines
    assert len(out.lines) == 1, out.lines
    [line] = out.lines
    assert sorted(line) == sorted(reference), line
    assert line["status"] == http_rendering(door, case), line
