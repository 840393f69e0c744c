"""Issue 19, the door's half: what the gateway refuses, on every door, against the real stack (Triton and
Redis behind the session gateway): tensor parameters it does not support (shared memory above all),
sequence parameters for a model without a sequence batcher, malformed sequence ids, lone surrogates,
booleans in a shape, duplicate inputs, gRPC data given twice, classification, decoupled models outside
gRPC streams; and bodies built to stall the event loop (depth bombs, nested empty lists)."""

from __future__ import annotations

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
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from websockets.sync.client import connect

from app.codecs import v1, v2
from app.services.inference import DECOUPLED_REFUSAL
from app.services.registry import ModelInfo, TensorSpec
from tests.integration.conftest import GatewayFactory

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
def test_decoupled_models_are_refused_alike_on_v1_v2_jobs_and_ws(
    gateway_url: str, client: httpx.Client
) -> None:
    v1_body = {"inputs": {"COUNT": [2]}}
    answers = {
        "v1": client.post("/v1/models/repeat_decoupled/infer", json=v1_body),
        "v2": client.post("/v2/models/repeat_decoupled/infer",
                          json={"inputs": [{"name": "COUNT", "shape": [1], "datatype": "INT32", "data": [2]}]}),
        "job": client.post("/v1/models/repeat_decoupled/jobs", json=v1_body),
    }  # fmt: skip
    assert {k: r.status_code for k, r in answers.items()} == {"v1": 501, "v2": 501, "job": 501}
    assert answers["v1"].json()["error"]["message"] == answers["v2"].json()["error"] == DECOUPLED_REFUSAL
    assert answers["job"].json()["error"]["message"] == DECOUPLED_REFUSAL
    with connect(gateway_url.replace("http", "ws") + "/v1/ws") as ws:
        ws.send(json.dumps({"op": "infer", "ref": "d", "model": "repeat_decoupled", **v1_body}))
        frame = json.loads(ws.recv(timeout=10))
    assert frame["type"] == "error" and frame["error"]["message"] == DECOUPLED_REFUSAL, frame


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


def test_attack_bodies_never_stall_the_event_loop(gateway_url: str) -> None:
    """Several 7.3 MB depth bombs and nested-empty-list bodies in parallel, on /v1, /v2 JSON data, jobs and
    /v1/ws (fixed and variable-dimension models): each is refused with a 4xx, and /healthz, polled all
    along, keeps answering (it waited 5.1 s behind 4 such bodies before). The decode of each body is also
    timed on its own (the event-loop time one request costs)."""
    attacks = _attacks()
    latencies: queue.Queue[float] = queue.Queue()
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=gateway_url, timeout=30) as c:
            while not stop.is_set():
                start = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                latencies.put(time.perf_counter() - start)
                time.sleep(0.02)  # pacing: a probe every 20 ms

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda a: (a[0], a[1], _send(gateway_url, a[1], a[2])), attacks))
    finally:
        stop.set()
        poller.join(timeout=30)
    worst = max(latencies.queue)
    print(f"/healthz during the attack: {latencies.qsize()} polls, worst {worst * 1000:.0f} ms")
    assert all(400 <= status < 500 for _, _, status in statuses), statuses
    assert latencies.qsize() >= 5 and worst < 0.5, worst
    # the per-request cost, measured alone: what one body holds the loop for
    ident = ModelInfo(name="identity_fp32", version="1", versions=("1",), platform="python", max_batch_size=64,
                      inputs={"INPUT0": TensorSpec("INPUT0", "FP32", (-1, -1))},
                      outputs={"OUTPUT0": TensorSpec("OUTPUT0", "FP32", (-1, -1))})  # fmt: skip
    costs = {}
    for kind, path, body in attacks:
        if path.startswith(("/v1/models/identity_fp32/infer", V2)):
            start = time.perf_counter()
            with pytest.raises(Exception):  # noqa: B017 - a 4xx domain error of either codec
                (v2.decode(ident, body, None) if path == V2 else v1.decode(ident, body))
            costs[f"{kind} {path}"] = time.perf_counter() - start
    print("\nper-body decode (event-loop) cost:", {k: f"{v * 1000:.1f} ms" for k, v in costs.items()})
    assert max(costs.values()) < 0.25, costs  # was 1.6 s (depth) and 2.8 s (empties); ~10-40 ms now
