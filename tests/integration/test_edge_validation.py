"""Issue 19, the door's half: what the gateway refuses, on every door, against the real stack (Triton and
Redis behind the session gateway): tensor parameters it does not support (shared memory above all),
sequence parameters for a model without a sequence batcher, malformed sequence ids, lone surrogates,
booleans in a shape, duplicate inputs, gRPC data given twice, classification, decoupled models outside
gRPC streams; bodies built to stall the event loop (depth bombs, nested empty lists), and legitimate bodies
as large as the limits allow: neither holds the event loop more than 20 ms at a time."""

from __future__ import annotations

import contextlib
import json
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from websockets.sync.client import connect

from app.launcher import EmbeddedRedis, EmbeddedTriton
from app.services.inference import DECOUPLED_REFUSAL
from tests.integration.conftest import GatewayFactory
from tests.integration.serve_workers import serving_workers

pytestmark = pytest.mark.integration

ROW = {"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}
V2 = "/v2/models/identity_fp32/infer"


@pytest.fixture
def stub(gateway_grpc: str) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(gateway_grpc) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _request(model: str = "identity_fp32", name: str = "INPUT0") -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name=model, id="r")
    message.inputs.add(name=name, datatype="FP32", shape=[1, 2])
    message.raw_input_contents.append(np.array([1.0, 2.0], np.float32).tobytes())
    return message


def _refused(client: httpx.Client, body: Any, field: str, path: str = V2, **kw: Any) -> dict[str, Any]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post(path, content=content, headers={"content-type": "application/json", **kw})
    assert r.status_code in (400, 422), (r.status_code, r.text)
    answer = r.json()
    details = answer["details"] if path.startswith("/v2") else answer["error"]["details"]
    assert details.get("field") == field, answer
    return answer


def _grpc_refused(stub: service_pb2_grpc.GRPCInferenceServiceStub, message: Any, field: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stub.ModelInfer(message, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert field in (err.value.details() or ""), err.value.details()


def _stream_errors(gateway_grpc: str, requests: list[service_pb2.ModelInferRequest]) -> list[str]:
    """The answers of one ModelStreamInfer call carrying ``requests``: their error messages."""
    with grpc.insecure_channel(gateway_grpc) as channel:
        stream = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
            iter(requests), timeout=20
        )
        answers = list(stream)
    assert len(answers) == len(requests)
    return [a.error_message for a in answers]


# --- item 1: tensor parameters the gateway does not support, on every door ----------------------------------
def test_shared_memory_and_unknown_tensor_parameters_are_refused_on_every_door(
    client: httpx.Client, stub: service_pb2_grpc.GRPCInferenceServiceStub, gateway_grpc: str
) -> None:
    region = {"shared_memory_region": "tgw_pool", "shared_memory_byte_size": 8}
    # /v2 JSON: an input naming a region, an output naming one
    _refused(
        client, {"inputs": [{**ROW, "parameters": region}]}, "inputs.INPUT0.parameters.shared_memory_region"
    )
    _refused(client, {"inputs": [ROW], "outputs": [{"name": "OUTPUT0", "parameters": region}]},
             "outputs.OUTPUT0.parameters.shared_memory_region")  # fmt: skip
    _refused(client, {"inputs": [{**ROW, "parameters": {"anything_else": 1}}]},
             "inputs.INPUT0.parameters.anything_else")  # fmt: skip
    # /v2 binary
    head = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 8, **region}}]}).encode()  # fmt: skip
    _refused(client, head + np.array([1.0, 2.0], np.float32).tobytes(),
             "inputs.INPUT0.parameters.shared_memory_region", **{"inference-header-content-length": str(len(head))})  # fmt: skip
    # what the gateway does support still works: binary data in and out
    plain = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32",
                                    "parameters": {"binary_data_size": 8}}],
                        "outputs": [{"name": "OUTPUT0", "parameters": {"binary_data": True}}]}).encode()  # fmt: skip
    ok = client.post(V2, content=plain + np.array([1.0, 2.0], np.float32).tobytes(),
                     headers={"inference-header-content-length": str(len(plain))})  # fmt: skip
    assert ok.status_code == 200 and ok.headers["inference-header-content-length"]
    # gRPC ModelInfer: the input and the output
    message = _request()
    message.inputs[0].parameters["shared_memory_region"].string_param = "tgw_pool"
    _grpc_refused(stub, message, "inputs.INPUT0.parameters.shared_memory_region")
    message = _request()
    message.outputs.add(name="OUTPUT0").parameters["shared_memory_region"].string_param = "tgw_pool"
    _grpc_refused(stub, message, "outputs.OUTPUT0.parameters.shared_memory_region")
    # gRPC ModelStreamInfer: a decoupled model's request is decoded (and refused) before any relay
    decoupled = service_pb2.ModelInferRequest(model_name="repeat_decoupled", id="d")
    tensor = decoupled.inputs.add(name="COUNT", datatype="INT32", shape=[1])
    tensor.parameters["shared_memory_region"].string_param = "tgw_pool"
    decoupled.raw_input_contents.append(np.array([2], np.int32).tobytes())
    streamed = _request()
    streamed.inputs[0].parameters["shared_memory_region"].string_param = "tgw_pool"
    errors = _stream_errors(gateway_grpc, [decoupled, streamed])
    assert all("parameters.shared_memory_region" in e for e in errors), errors


# --- items 4 and 14: sequence parameters --------------------------------------------------------------------
@pytest.mark.parametrize(("value", "says"), [(7, "no sequence batcher"), (-5, "expected an integer"),
                                             ("s" * 129, "at most 128 characters")])  # fmt: skip
def test_sequence_parameters_are_validated_at_the_door(
    client: httpx.Client, stub: service_pb2_grpc.GRPCInferenceServiceStub, gateway_grpc: str, value: Any,
    says: str,
) -> None:  # fmt: skip
    answer = _refused(client, {"inputs": [ROW], "parameters": {"sequence_id": value, "sequence_start": True}},
                      "parameters.sequence_id")  # fmt: skip
    assert says in answer["error"], answer
    message = _request()
    if isinstance(value, int):
        message.parameters["sequence_id"].int64_param = value
    else:
        message.parameters["sequence_id"].string_param = value
    _grpc_refused(stub, message, "parameters.sequence_id")
    (error,) = _stream_errors(gateway_grpc, [message])  # refused, never relayed to Triton
    assert "parameters.sequence_id" in error and says in error, error


def test_sequence_start_alone_needs_a_sequence_model(client: httpx.Client) -> None:
    _refused(client, {"inputs": [ROW], "parameters": {"sequence_start": True}}, "parameters.sequence_start")


# --- item 12: lone surrogates -------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "field"), [
    (b'{"inputs": [{"name": "\\ud800", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}', "inputs[0].name"),
    (b'{"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], '
     b'"outputs": [{"name": "\\udc00"}]}', "outputs[0].name"),
    (b'{"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}], '
     b'"parameters": {"note": "a\\ud800b"}}', "parameters.note"),
])  # fmt: skip
def test_lone_surrogates_are_a_400_naming_the_field(client: httpx.Client, body: bytes, field: str) -> None:
    answer = _refused(client, body, field)
    assert "surrogate" in answer["error"]
    v1_body = b'{"inputs": {"INPUT0": [[1.0, 2.0]]}, "parameters": {"note": "\\ud800"}}'
    _refused(client, v1_body, "parameters.note", path="/v1/models/identity_fp32/infer")


# --- item 13: a boolean in a shape --------------------------------------------------------------------------
def test_boolean_in_a_shape_is_a_400(client: httpx.Client) -> None:
    _refused(client, {"inputs": [{**ROW, "shape": [True, 2]}]}, "inputs.INPUT0.shape")


# --- item 15: decoupled models outside gRPC streams ---------------------------------------------------------
def test_decoupled_models_are_refused_alike_on_v1_v2_and_jobs(gateway_url: str, client: httpx.Client) -> None:
    """Refused (501) where one answer is expected; ``/v1/ws`` streams them instead (one ``stream`` frame per
    response: tests/integration/test_ws_streams.py)."""
    v1_body = {"inputs": {"COUNT": [2]}}
    answers = {
        "v1": client.post("/v1/models/repeat_decoupled/infer", json=v1_body),
        "v2": client.post("/v2/models/repeat_decoupled/infer",
                          json={"inputs": [{"name": "COUNT", "shape": [1], "datatype": "INT32", "data": [2]}]}),
    }  # fmt: skip
    assert {k: r.status_code for k, r in answers.items()} == {"v1": 501, "v2": 501}
    assert answers["v1"].json()["error"]["message"] == answers["v2"].json()["error"] == DECOUPLED_REFUSAL
    # a job on it is accepted: its worker streams it (tests/integration/test_jobs_stream.py)
    job = client.post("/v1/models/repeat_decoupled/jobs", json=v1_body)
    assert job.status_code == 202, job.text
    client.delete(f"/v1/jobs/{job.json()['id']}")
    with connect(gateway_url.replace("http", "ws") + "/v1/ws") as ws:
        ws.send(json.dumps({"op": "infer", "ref": "d", "model": "repeat_decoupled", **v1_body}))
        frames = [json.loads(ws.recv(timeout=10)) for _ in range(3)]
    assert [(f["type"], f["seq"], f["final"]) for f in frames] == [
        ("stream", 1, False),
        ("stream", 2, False),
        ("stream", 3, True),
    ], frames


# --- item 16: classification (Triton's extension) is forwarded, answered and cached as Triton answers it ----
def _top_k(client: Any, module: Any, k: int, row: np.ndarray) -> list[Any]:
    tensor = module.InferInput("INPUT0", list(row.shape), "FP32")
    tensor.set_data_from_numpy(row)
    result = client.infer(
        "identity_fp32", [tensor], outputs=[module.InferRequestedOutput("OUTPUT0", class_count=k)]
    )
    output = result.get_output("OUTPUT0")
    datatype = output["datatype"] if isinstance(output, dict) else output.datatype
    return [datatype, result.as_numpy("OUTPUT0").tolist()]


def test_classification_is_answered_as_triton_answers_it(
    triton: Any, gateway_addresses: Any, client: httpx.Client, start_gateway: GatewayFactory
) -> None:
    row = np.array([[0.25, 3.5, -1.0, 2.0]], np.float32) + np.float32(time.time() % 1000)  # not cached yet
    answers = {}
    for name, http, grpc_address in (("triton", triton.http_url, triton.grpc_url),
                                     ("gateway", gateway_addresses.http, gateway_addresses.grpc)):  # fmt: skip
        h = httpclient.InferenceServerClient(http.split("://", 1)[1])
        g = grpcclient.InferenceServerClient(grpc_address)
        try:
            answers[name] = [_top_k(h, httpclient, 2, row), _top_k(g, grpcclient, 3, row)]
        finally:
            h.close()
            g.close()
    assert answers["gateway"] == answers["triton"], answers
    assert answers["gateway"][0][0] == "BYTES" and len(answers["gateway"][0][1][0]) == 2  # top 2, as strings
    # the cache keys on it: the plain tensor, the top-2 and the top-1 are three answers, each then a hit
    tensor = {"name": "INPUT0", "shape": [1, 4], "datatype": "FP32", "data": row.ravel().tolist()}
    bodies = [{"inputs": [tensor]}] + [
        {"inputs": [tensor], "outputs": [{"name": "OUTPUT0", "parameters": {"classification": k}}]}
        for k in (2, 1)
    ]
    for body in bodies * 2:
        r = client.post(V2, json=body)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        k = body.get("outputs", [{"parameters": {}}])[0]["parameters"].get("classification")
        assert out["datatype"] == ("BYTES" if k else "FP32") and len(out["data"]) == (k or 4), out
    _refused(client, {"inputs": [tensor], "outputs": [{"name": "OUTPUT0", "parameters": {"classification": -1}}]},
             "outputs.OUTPUT0.parameters.classification")  # fmt: skip
    with start_gateway(triton_http_url=None) as over_grpc:  # the gRPC transport to Triton forwards it too
        h = httpclient.InferenceServerClient(over_grpc.split("://", 1)[1])
        try:
            direct = httpclient.InferenceServerClient(triton.http_url.split("://", 1)[1])
            try:
                assert _top_k(h, httpclient, 3, row + 1) == _top_k(direct, httpclient, 3, row + 1)
            finally:
                direct.close()
        finally:
            h.close()


# --- items 17 and 19: an input twice; gRPC data twice ---------------------------------------------------------
def test_duplicate_inputs_and_data_given_twice_are_refused(
    client: httpx.Client, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    _refused(client, {"inputs": [ROW, ROW]}, "inputs.INPUT0")
    message = _request()
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2])
    message.raw_input_contents.append(np.array([1.0, 2.0], np.float32).tobytes())
    _grpc_refused(stub, message, "inputs.INPUT0")
    both = _request()
    both.inputs[0].contents.fp32_contents.extend([1.0, 2.0])
    _grpc_refused(stub, both, "inputs.INPUT0.contents")


# --- item 8: no body stalls the event loop --------------------------------------------------------------------
MB = 1024 * 1024


def _depth_bomb(size: int) -> bytes:
    return b"[" * (size // 2) + b"]" * (size // 2)


def _empty_lists(size: int) -> bytes:
    return b"[" + b",".join([b"[[]]"] * (size // 5)) + b"]"


def _not_json(size: int) -> bytes:
    """A long list of numbers with no closing bracket: orjson reads it all, then refuses it."""
    return b"[[" + b"1.25," * (size // 5) + b"1.0]"


def _nan(size: int) -> bytes:
    """Numbers ending in a NaN literal (what Python's json.dumps writes): not JSON, so orjson refuses it; the
    Python parser that could name the input holds the interpreter lock ~0.35 s for 7 MB."""
    return b"[[" + b"1.25," * (size // 5) + b"NaN]]"


def _attacks() -> list[tuple[str, str, bytes]]:
    """(kind, path, body): 7.3 MB for the infer routes, under the 4 MiB job and frame limits elsewhere."""
    size = int(7.3 * 1000 * 1000)
    out = []
    for kind, make in (
        ("depth", _depth_bomb),
        ("empties", _empty_lists),
        ("not-json", _not_json),
        ("nan", _nan),
    ):
        tensor = make(size)
        out.append((kind, "/v1/models/identity_fp32/infer", b'{"inputs": {"INPUT0": ' + tensor + b"}}"))
        out.append((kind, "/v1/models/forecast/infer", b'{"inputs": {"series": ' + tensor + b"}}"))
        out.append((kind, V2, b'{"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": '
                    + tensor + b"}]}"))  # fmt: skip
        small = make(int(3.9 * MB))
        out.append((kind, "/v1/models/identity_fp32/jobs", b'{"inputs": {"INPUT0": ' + small + b"}}"))
        out.append((kind, "ws", b'{"op": "infer", "ref": "x", "model": "forecast", "inputs": {"series": '
                    + small + b"}}"))  # fmt: skip
    return out


def _send(gateway_url: str, path: str, body: bytes) -> int:
    if path == "ws":
        with connect(gateway_url.replace("http", "ws") + "/v1/ws", max_size=None) as ws:
            ws.send(body.decode())
            frame = json.loads(ws.recv(timeout=60))
        assert frame["type"] == "error", frame
        return 400 if frame["error"]["code"] in ("bad_request", "invalid_input") else 500
    r = httpx.post(gateway_url + path, content=body, timeout=60, headers={"content-type": "application/json"})
    return r.status_code


# What the goal bounds: the longest the gateway's event loop is held by one step of work. The gateway measures
# it itself (app.observability.loop): CPU time of the loop thread between two 5 ms heartbeats, so neither the
# OS preempting it (2 shared cores: Triton, the test's clients and the decode processes compete) nor waiting
# for the interpreter lock counts. One step of S ms shows as a window of >= S ms; a window may also hold up
# to ~5 ms of other short steps.
STEP_BOUND_S = 0.020
# Several large requests at once: one loop iteration may run a step of each before the heartbeat's turn.
CONCURRENT_WINDOW_BOUND_S = 0.050


@contextlib.contextmanager
def _polling_healthz(url: str) -> Iterator[queue.Queue[float]]:
    """/healthz polled every 20 ms from a thread while the block runs (each must answer 200): the queue
    gets each poll's wall-clock latency."""
    latencies: queue.Queue[float] = queue.Queue()
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                start = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                latencies.put(time.perf_counter() - start)
                time.sleep(0.02)  # pacing

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        yield latencies
    finally:
        stop.set()
        poller.join(timeout=30)


def _loop_windows(url: str) -> dict[str, dict[str, float]]:
    """Cumulative bucket counts (and ``count``) of ``tgw_event_loop_busy_seconds`` and ``..._lag_seconds``."""
    out: dict[str, dict[str, float]] = {"busy": {}, "lag": {}}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        for kind in out:
            name = f"tgw_event_loop_{kind}_seconds"
            if line.startswith(f"{name}_bucket{{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                out[kind][le] = out[kind].get(le, 0.0) + float(line.rsplit(" ", 1)[1])
            elif line.startswith(f"{name}_count"):
                out[kind]["count"] = out[kind].get("count", 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _loop_report(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]], bound_s: float = STEP_BOUND_S
) -> tuple[int, str]:
    """(heartbeat windows whose loop CPU exceeded ``STEP_BOUND_S``, a line with the worst windows: busy, and
    the wall-clock lag of the beat for comparison, machine contention included)."""
    parts, over = [], 0
    for kind in ("busy", "lag"):
        delta = {le: after[kind].get(le, 0.0) - before[kind].get(le, 0.0) for le in after[kind]}
        total = delta["count"]
        above = int(total - delta[str(bound_s)])
        bounds = sorted((float(le), le) for le in delta if le not in ("count", "+Inf"))
        worst = next((f"<= {value * 1000:g} ms" for value, le in bounds if delta[le] >= total), "> 1 s")
        parts.append(f"{kind}: {int(total)} windows, {above} over {bound_s * 1000:g} ms, worst {worst}")
        over = above if kind == "busy" else over
    return over, "; ".join(parts)


def test_attack_bodies_never_stall_the_event_loop(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis, tmp_path: Any
) -> None:
    """7.3 MB depth bombs, nested-empty-list, not-JSON and NaN bodies on /v1, /v2 JSON data, jobs and
    /v1/ws (fixed and variable-dimension models), against ``tgw serve`` (uvloop, one worker, its decode
    process): each is refused with a 4xx. One at a time, no step of the gateway's event loop lasts more
    than 20 ms (they are refused in the decode process: the loop only receives them). Then all of them,
    four at a time, while /healthz is polled: /healthz keeps answering (it waited 5.1 s behind 4 such
    bodies before) and no heartbeat window exceeds 50 ms (a window may hold a step of each)."""
    attacks = _attacks()
    with serving_workers(triton, redis_server, tmp_path / "tgw.log", workers=1, TGW_DECODE_PROCESSES="1",
                         TGW_LOOP_BEAT_MS="5") as url:  # fmt: skip
        for _kind, path, body in attacks:  # each once: connections, routes, the pool and each error path warm
            _send(url, path, body)
        before = _loop_windows(url)
        alone = [(kind, path, _send(url, path, body)) for kind, path, body in attacks]  # one at a time
        over_alone, report_alone = _loop_report(before, _loop_windows(url))
        before = _loop_windows(url)
        with _polling_healthz(url) as latencies, ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda a: (a[0], a[1], _send(url, a[1], a[2])), attacks))
        over, report = _loop_report(before, _loop_windows(url), CONCURRENT_WINDOW_BOUND_S)
    worst = max(latencies.queue)
    print(
        f"\nattack bodies one at a time: event loop {report_alone}"
        f"\nattack bodies four at a time: event loop {report}; /healthz {latencies.qsize()} polls, worst "
        f"{worst * 1000:.0f} ms"
    )
    assert all(400 <= status < 500 for _, _, status in alone), alone
    assert over_alone == 0, report_alone
    assert all(400 <= status < 500 for _, _, status in statuses), statuses
    assert latencies.qsize() >= 5 and worst < 1.0, worst
    assert over == 0, report


# --- legitimate maximal bodies: decoded and answered in full, the loop free all along ------------------------
def _floats(count: int) -> np.ndarray:
    """Numbers as a client sends them (three decimals: ~6 bytes of JSON a value), exact in float32."""
    return np.round(np.random.default_rng(count).random(count), 3).astype(np.float32)


def _fit(limit: int, make: Any) -> tuple[np.ndarray, bytes]:
    """The largest body ``make(values)`` within ``limit`` bytes (and its values)."""
    count = limit // 5
    while True:
        values = _floats(count)
        body = make(values)
        if len(body) <= limit:
            return values, body
        count = int(count * limit / len(body) * 0.999)


def _v1_body(values: np.ndarray) -> bytes:
    return orjson.dumps({"inputs": {"INPUT0": values.reshape(1, -1)}}, option=orjson.OPT_SERIALIZE_NUMPY)


def _v2_body(values: np.ndarray) -> bytes:
    tensor = {"name": "INPUT0", "shape": [1, values.size], "datatype": "FP32", "data": values}
    return orjson.dumps({"inputs": [tensor]}, option=orjson.OPT_SERIALIZE_NUMPY)


def _ws_frame(values: np.ndarray) -> bytes:
    frame = {
        "op": "infer",
        "ref": "big",
        "model": "identity_fp32",
        "inputs": {"INPUT0": values.reshape(1, -1)},
    }
    return orjson.dumps(frame, option=orjson.OPT_SERIALIZE_NUMPY)


def _dense_v1(limit: int) -> tuple[np.ndarray, bytes]:
    """The most values a body can carry: single digits, 2 bytes a value (~4.2M values in 8 MiB)."""
    digits = np.random.default_rng(7).integers(0, 10, (limit - 64) // 2)
    text = ",".join(map(str, digits.tolist())).encode()
    return digits.astype(np.float32), b'{"inputs":{"INPUT0":[[' + text + b"]]}}"


def _tgw_serve_descendants() -> list[psutil.Process]:
    serve = [p for p in psutil.Process().children() if p.cmdline()[-1:] == ["serve"]]
    assert len(serve) == 1, serve
    return [serve[0], *serve[0].children(recursive=True)]


def test_legitimate_maximal_bodies_keep_the_event_loop_free(
    triton: EmbeddedTriton, redis_server: EmbeddedRedis, tmp_path: Any
) -> None:
    """``tgw serve`` (uvloop, one worker, its decode process, an in-process job worker): /v1 and /v2 JSON
    bodies of ~8 MiB of numbers to identity_fp32 (answers as large), the densest /v1 body (4.2M values), a
    4 MiB /v1/ws frame and a 4 MiB job. Each is answered with the right values (202 and then the result,
    for the job). One at a time, no step of the gateway's event loop lasts more than 20 ms (the goal: no
    single request holds the loop longer). Then six at once while /healthz is polled: /healthz keeps
    answering, and no heartbeat window exceeds 50 ms (a window may hold one step of each of the six
    requests, so the per-request bound does not apply to it). When the gateway stops (SIGTERM), its decode
    process and every other child are gone."""
    limit, small_limit = 8 * 1024 * 1024, 4 * 1024 * 1024
    v1_values, v1_body = _fit(limit, _v1_body)
    v2_values, v2_body = _fit(limit, _v2_body)
    dense_values, dense_body = _dense_v1(limit)
    ws_values, ws_frame = _fit(small_limit, _ws_frame)
    job_values, job_body = _fit(small_limit, _v1_body)
    print(
        f"\nbodies: /v1 {len(v1_body)} B ({v1_values.size} values), /v2 {len(v2_body)} B, dense /v1 "
        f"{len(dense_body)} B ({dense_values.size} values), ws {len(ws_frame)} B, job {len(job_body)} B"
    )

    def post(url: str, path: str, body: bytes) -> httpx.Response:
        return httpx.post(url + path, content=body, timeout=120, headers={"content-type": "application/json"})

    def v1_ok(url: str, body: bytes, values: np.ndarray) -> str:
        r = post(url, "/v1/models/identity_fp32/infer", body)
        assert r.status_code == 200, r.text[:300]
        np.testing.assert_array_equal(
            np.asarray(orjson.loads(r.content)["outputs"]["OUTPUT0"], np.float32)[0], values
        )
        return "v1"

    def v2_ok(url: str) -> str:
        r = post(url, V2, v2_body)
        assert r.status_code == 200, r.text[:300]
        (out,) = orjson.loads(r.content)["outputs"]
        assert out["shape"] == [1, v2_values.size]
        np.testing.assert_array_equal(np.asarray(out["data"], np.float32), v2_values)
        return "v2"

    def ws_ok(url: str) -> str:
        with connect(url.replace("http", "ws") + "/v1/ws", max_size=None) as ws:
            ws.send(ws_frame.decode())
            while (frame := orjson.loads(ws.recv(timeout=120)))["type"] == "heartbeat":
                pass
        assert frame["type"] == "result" and frame["ref"] == "big", str(frame)[:300]
        np.testing.assert_array_equal(
            np.asarray(frame["result"]["outputs"]["OUTPUT0"], np.float32)[0], ws_values
        )
        return "ws"

    def job_ok(url: str) -> str:
        r = post(url, "/v1/models/identity_fp32/jobs", job_body)
        assert r.status_code == 202, r.text[:300]
        deadline = time.monotonic() + 120
        while (job := httpx.get(url + f"/v1/jobs/{r.json()['id']}", timeout=60).json())[
            "status"
        ] != "succeeded":
            assert job["status"] in ("queued", "running") and time.monotonic() < deadline, str(job)[:300]
            time.sleep(0.2)
        np.testing.assert_array_equal(
            np.asarray(job["result"]["outputs"]["OUTPUT0"], np.float32)[0], job_values
        )
        return "job"

    with serving_workers(triton, redis_server, tmp_path / "tgw.log", workers=1, TGW_WORKER_IN_PROCESS="true",
                         TGW_DECODE_PROCESSES="1", TGW_LOOP_BEAT_MS="5") as url:  # fmt: skip
        alone = {
            "v1": lambda: v1_ok(url, v1_body, v1_values), "v2": lambda: v2_ok(url), "ws": lambda: ws_ok(url),
            "job": lambda: job_ok(url), "dense v1": lambda: v1_ok(url, dense_body, dense_values),
        }  # fmt: skip
        for check in alone.values():
            check()  # each door once: connections, routes, Triton's instance and the pool warm
        one_at_a_time = {}
        for name, check in alone.items():
            before = _loop_windows(url)
            check()
            one_at_a_time[name] = _loop_report(before, _loop_windows(url))
            print(f"{name} alone: event loop {one_at_a_time[name][1]}")
        children = _tgw_serve_descendants()
        assert len(children) >= 2, children  # the gateway and its decode process (and the resource tracker)
        before = _loop_windows(url)
        start = time.perf_counter()
        with _polling_healthz(url) as latencies, ThreadPoolExecutor(6) as pool:
            done = list(pool.map(lambda check: check(), [
                lambda: v1_ok(url, v1_body, v1_values), lambda: v2_ok(url), lambda: ws_ok(url),
                lambda: job_ok(url), lambda: v1_ok(url, dense_body, dense_values), lambda: v2_ok(url),
            ]))  # fmt: skip
        elapsed = time.perf_counter() - start
        over, report = _loop_report(before, _loop_windows(url), CONCURRENT_WINDOW_BOUND_S)
        worst = max(latencies.queue)
        print(
            f"legitimate maximal bodies at once ({done}, {elapsed:.1f} s): event loop {report}; /healthz "
            f"{latencies.qsize()} polls, worst {worst * 1000:.0f} ms"
        )
    assert {name: text for name, (count, text) in one_at_a_time.items() if count} == {}
    assert sorted(done) == ["job", "v1", "v1", "v2", "v2", "ws"]
    assert latencies.qsize() >= 5 and worst < 1.0, worst
    assert over == 0, report
    gone = psutil.wait_procs(children, timeout=15)[1]
    assert not gone, f"left behind after the gateway stopped: {gone}"
