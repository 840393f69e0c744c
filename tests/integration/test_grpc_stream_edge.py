"""``ModelStreamInfer`` at the edge (issue 19), against the real Triton and Redis: the relay carries only
what the gateway validated (no shared-memory region of Triton's reaches a client), every stream message
is limited like a unary call (rate, in-flight slots, daily quota, the key's tier), decoupled responses
never share an upstream stream with others (Triton 2.51 aborts), a revoked key's stream and WebSocket
stop within the cache bound, a stream whose answers are not read is not read either (bounded memory),
and an undecodable message is INVALID_ARGUMENT.

The module runs its own Triton (same launcher as ``tgw up``) with a few of ``tests/models`` and a sequence
model (``stream_models/sequence_fp32``): sequence requests are relayed to Triton only for models with a
sequence batcher, and that model is kept out of the shared repository the conformance suite walks."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import psutil
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from tritonclient.grpc import service_pb2, service_pb2_grpc
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from app.clients.tensors import set_parameter
from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port
from tests.eventually import eventually
from tests.gateway_server import GatewayAddresses, running_gateway_addresses
from tests.integration.test_auth import ADMIN, auth_settings, make_key

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

REGION_VALUES = np.array([3.14159, 2.71828, 1.41421, 42.0], np.float32)
HERE = Path(__file__).resolve().parent
SEQUENCE = "sequence_fp32"


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    """This module's Triton: identity, decoupled, priority and sleep test models plus a sequence model."""
    repo = tmp_path_factory.mktemp("stream_models")
    ignore = shutil.ignore_patterns("__pycache__")
    for name in ("identity_fp32", "repeat_decoupled", "priority_fp32", "sleep_fp32"):
        shutil.copytree(HERE.parent / "models" / name, repo / name, ignore=ignore)
    shutil.copytree(HERE / "stream_models" / SEQUENCE, repo / SEQUENCE, ignore=ignore)
    server = EmbeddedTriton([repo], http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                            state_dir=tmp_path_factory.mktemp("stream_triton"))  # fmt: skip
    server.start(timeout=180)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> Iterator[GatewayAddresses]:
    with running_gateway_addresses(
        triton_url=triton.grpc_url, triton_http_url=triton.http_url, redis_url=redis_server.url
    ) as addresses:
        yield addresses


def fp32_request(values: np.ndarray, rid: str, model: str = "identity_fp32", name: str = "INPUT0",
                 **params: Any) -> service_pb2.ModelInferRequest:  # fmt: skip
    req = service_pb2.ModelInferRequest(model_name=model, id=rid)
    req.inputs.add(name=name, datatype="FP32", shape=values.shape)
    req.raw_input_contents.append(values.astype(np.float32).tobytes())
    for key, value in params.items():
        set_parameter(req.parameters[key], value)
    return req


def count_request(count: int, rid: str, **params: Any) -> service_pb2.ModelInferRequest:
    req = service_pb2.ModelInferRequest(model_name="repeat_decoupled", id=rid)
    req.inputs.add(name="COUNT", datatype="INT32", shape=[1])
    req.raw_input_contents.append(np.array([count], np.int32).tobytes())
    for key, value in params.items():
        set_parameter(req.parameters[key], value)
    return req


def output(response: service_pb2.ModelStreamInferResponse, name: str, dtype: Any) -> np.ndarray:
    infer = response.infer_response
    for i, out in enumerate(infer.outputs):
        if out.name == name:
            return np.frombuffer(infer.raw_output_contents[i], dtype=dtype).reshape(list(out.shape))
    raise AssertionError(f"no output {name} in {infer}")


def unique_seq() -> int:
    return int(time.time_ns() % 1_000_000_000) + 1


@contextlib.contextmanager
def stub_for(address: str) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    limit = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    with grpc.insecure_channel(address, options=limit) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


@contextlib.contextmanager
def system_region(triton: EmbeddedTriton, values: np.ndarray) -> Iterator[tuple[str, Any]]:
    """A system shared-memory region holding ``values``, registered on Triton's OWN port (as another
    application beside Triton, or the gateway's TGW_TRITON_SHM pool, would have it)."""
    name = f"tgw_edge_{os.getpid()}_{time.time_ns()}"
    handle = shm.create_shared_memory_region(name, "/" + name, values.nbytes)
    shm.set_shared_memory_region(handle, [values])
    direct = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        direct.register_system_shared_memory(name, "/" + name, values.nbytes)
        yield name, handle
    finally:
        with contextlib.suppress(Exception):
            direct.unregister_system_shared_memory(name)
        direct.close()
        shm.destroy_shared_memory_region(handle)


def with_region(req: service_pb2.ModelInferRequest, region: str, nbytes: int, output: bool = False) -> None:
    tensor = req.outputs.add(name="OUTPUT0") if output else req.inputs[0]
    tensor.parameters["shared_memory_region"].string_param = region
    tensor.parameters["shared_memory_byte_size"].int64_param = nbytes
    tensor.parameters["shared_memory_offset"].int64_param = 0


# --- 1: the relay sends what the gateway validated, never the client's bytes -------------------------
def test_stream_relay_never_reads_or_writes_a_tritons_shared_memory_region(
    triton: EmbeddedTriton, gateway: GatewayAddresses
) -> None:
    with system_region(triton, REGION_VALUES) as (region, handle), stub_for(gateway.grpc) as stub:
        zeros = np.zeros((1, 4), np.float32)
        seq = unique_seq()
        reading = fp32_request(zeros, "read", model=SEQUENCE, sequence_id=seq, sequence_start=True,
                               sequence_end=True)  # fmt: skip
        with_region(reading, region, REGION_VALUES.nbytes)
        writing = fp32_request(np.full((1, 4), 7.0, np.float32), "write", model=SEQUENCE,
                               sequence_id=seq + 1, sequence_start=True, sequence_end=True)  # fmt: skip
        with_region(writing, region, REGION_VALUES.nbytes, output=True)
        decoupled = count_request(1, "dec")  # the region's bytes as COUNT would be 1078530000 responses
        decoupled.inputs[0].parameters["shared_memory_region"].string_param = region
        decoupled.inputs[0].parameters["shared_memory_byte_size"].int64_param = 4
        responses = list(stub.ModelStreamInfer(iter([reading, writing, decoupled]), timeout=60))
        answers = [r for r in responses if not r.error_message]
        for (
            r
        ) in answers:  # refused (INVALID_ARGUMENT naming the parameter) or answered from the client's data
            if r.infer_response.id in ("read", "write"):
                got = output(r, "OUTPUT0", np.float32)
                assert not np.allclose(got.ravel(), REGION_VALUES), "the region came back to the client"
        assert len([r for r in answers if r.infer_response.id == "dec"]) <= 1
        assert {r.infer_response.id for r in responses} >= {"read", "write"}  # each answered
        region_now = shm.get_contents_as_numpy(handle, np.float32, [4])
        assert np.allclose(region_now, REGION_VALUES), "the region was overwritten through the gateway"


# --- 2: every message is limited like a unary call, with the key's tier -------------------------------
@pytest.fixture(scope="module")
def auth_gateway(triton: EmbeddedTriton, redis_server: EmbeddedRedis) -> Iterator[GatewayAddresses]:
    with running_gateway_addresses(**auth_settings(triton, redis_server.url, auth_key_cache_s=5.0)) as gw:
        yield gw


def key_metadata(key: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key['key']}"),)


def test_every_stream_message_counts_against_the_keys_limits(auth_gateway: GatewayAddresses) -> None:
    key = make_key(auth_gateway.http, rps=1, burst=3, concurrency=1, daily_quota=5)
    requests = [fp32_request(np.full((1, 2), float(i), np.float32), f"r{i}") for i in range(100)]
    with stub_for(auth_gateway.grpc) as stub:
        responses = list(stub.ModelStreamInfer(iter(requests), metadata=key_metadata(key), timeout=60))
    assert len(responses) == 100  # every message answered: an answer or an error, nothing lost
    answered = [r for r in responses if not r.error_message]
    refused = [r for r in responses if r.error_message]
    assert 1 <= len(answered) <= 4, len(answered)  # burst 3, daily quota 5 (the stream took one)
    statuses = {r.infer_response.parameters["status"].string_param for r in refused}
    assert statuses == {"RESOURCE_EXHAUSTED"}, statuses
    assert all(r.infer_response.parameters["retry_after_s"].int64_param >= 1 for r in refused)


def test_stream_messages_take_the_daily_quota_and_in_flight_slots(auth_gateway: GatewayAddresses) -> None:
    quota = make_key(auth_gateway.http, rps=100, burst=100, concurrency=0, daily_quota=5)
    requests = [fp32_request(np.full((1, 2), float(i), np.float32), f"q{i}") for i in range(10)]
    with stub_for(auth_gateway.grpc) as stub:
        responses = list(stub.ModelStreamInfer(iter(requests), metadata=key_metadata(quota), timeout=60))
    assert [bool(r.error_message) for r in responses] == [False] * 4 + [True] * 6  # the stream took one
    assert "daily" in responses[-1].error_message
    one = make_key(auth_gateway.http, rps=100, burst=100, concurrency=1)
    slow = [fp32_request(np.full((1, 1), 1.5 + i / 1e6, np.float32), f"c{i}", model="sleep_fp32",
                         name="DELAY_S") for i in range(5)]  # fmt: skip
    with stub_for(auth_gateway.grpc) as stub:
        responses = list(stub.ModelStreamInfer(iter(slow), metadata=key_metadata(one), timeout=60))
    assert [bool(r.error_message) for r in responses] == [False] + [True] * 4  # one in flight at a time
    assert all("concurrency" in r.error_message for r in responses[1:]), responses[1].error_message


def test_relayed_stream_requests_get_the_keys_tier(auth_gateway: GatewayAddresses) -> None:
    """A standard-tier key asking for a 999 s timeout and priority 1 on a relayed (sequence) request:
    Triton sees the tier's 30 s bound (the model reports request.timeout())."""
    key = make_key(auth_gateway.http, tier="standard", rps=100, burst=100)
    req = fp32_request(np.zeros((1, 1), np.float32), "tier", model=SEQUENCE, sequence_id=unique_seq(),
                       sequence_start=True, sequence_end=True, timeout=999_000_000)  # fmt: skip
    req.parameters["priority"].uint64_param = 1
    with stub_for(auth_gateway.grpc) as stub:
        [response] = list(stub.ModelStreamInfer(iter([req]), metadata=key_metadata(key), timeout=30))
    assert not response.error_message, response.error_message
    assert output(response, "TIMEOUT_US", np.int64).ravel().tolist() == [30_000_000]


# --- 4: decoupled responses never interleave with others on one upstream stream ---------------------
def test_decoupled_and_sequence_requests_interleaved_keep_triton_up(
    triton: EmbeddedTriton, gateway: GatewayAddresses
) -> None:
    pid = triton.process.pid
    seq = unique_seq()
    requests: list[Any] = []
    for i in range(30):
        requests.append(count_request(4, f"d{i}"))
        requests.append(fp32_request(np.full((1, 3), float(i), np.float32), f"s{i}", model=SEQUENCE,
                                     sequence_id=seq + i, sequence_start=True, sequence_end=True))  # fmt: skip
        requests.append(count_request(3, f"e{i}"))
    with stub_for(gateway.grpc) as stub:
        responses = list(stub.ModelStreamInfer(iter(requests), timeout=120))
    errors = [r.error_message for r in responses if r.error_message]
    assert not errors, errors[:3]
    by_id: dict[str, int] = {}
    for r in responses:
        by_id[r.infer_response.id] = by_id.get(r.infer_response.id, 0) + 1
    assert all(by_id.get(f"d{i}") == 4 and by_id.get(f"e{i}") == 3 and by_id.get(f"s{i}") == 1
               for i in range(30)), by_id  # fmt: skip
    assert triton.process.pid == pid and triton.process.alive()
    direct = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        assert direct.is_server_ready()
    finally:
        direct.close()


# --- 5: revoking a key ends what it holds open --------------------------------------------------------
def test_revoked_key_streams_and_websockets_stop_within_the_cache_bound(
    auth_gateway: GatewayAddresses,
) -> None:
    key = make_key(auth_gateway.http, rps=200, burst=200)
    outcomes: dict[str, Any] = {}
    answered: set[str] = set()  # which of the five got a first answer
    revoked = threading.Event()

    def busy_stream() -> None:  # sends a request every 0.25 s and reads the answers
        def requests() -> Iterator[Any]:
            for i in range(200):
                yield fp32_request(np.full((1, 2), float(i), np.float32), f"b{i}")
                time.sleep(0.25)  # pacing: a request every 0.25 s

        last_answer = 0.0
        with stub_for(auth_gateway.grpc) as stub:
            try:
                for r in stub.ModelStreamInfer(requests(), metadata=key_metadata(key), timeout=60):
                    if not r.error_message:
                        last_answer = time.monotonic()
                        answered.add("busy")
            except grpc.RpcError as exc:
                outcomes["busy"] = (exc.code(), time.monotonic(), last_answer)

    def idle_stream() -> None:  # one request, then nothing: closed by the gateway's own check
        stop = threading.Event()

        def requests() -> Iterator[Any]:
            yield fp32_request(np.full((1, 2), 0.5, np.float32), "i0")
            stop.wait(60)

        with stub_for(auth_gateway.grpc) as stub:
            try:
                for _ in stub.ModelStreamInfer(requests(), metadata=key_metadata(key), timeout=60):
                    answered.add("idle")
            except grpc.RpcError as exc:
                outcomes["idle"] = (exc.code(), time.monotonic())
            finally:
                stop.set()

    ws_url = auth_gateway.http.replace("http", "ws", 1) + "/v1/ws"
    headers = {"Authorization": f"Bearer {key['key']}"}

    def busy_socket() -> None:
        with connect(ws_url, additional_headers=headers, open_timeout=10) as ws:
            last_answer = 0.0
            try:
                for i in range(200):
                    ws.send(json.dumps({"op": "infer", "ref": i, "model": "identity_fp32",
                                        "inputs": {"INPUT0": [[float(i), 1.0]]}}))  # fmt: skip
                    frame = json.loads(ws.recv(timeout=10))
                    if frame["type"] == "result":
                        last_answer = time.monotonic()
                        answered.add("ws")
                    time.sleep(0.25)  # pacing: a request every 0.25 s
            except ConnectionClosed as exc:
                outcomes["ws"] = (exc.rcvd.code if exc.rcvd else None, time.monotonic(), last_answer)

    def idle_socket() -> None:
        with connect(ws_url, additional_headers=headers, open_timeout=10) as ws:
            ws.send(json.dumps({"op": "ping"}))
            try:
                while True:
                    ws.recv(timeout=30)
                    answered.add("ws_idle")
            except ConnectionClosed as exc:
                outcomes["ws_idle"] = (exc.rcvd.code if exc.rcvd else None, time.monotonic())

    job = httpx.post(f"{auth_gateway.http}/v1/models/sleep_fp32/jobs", headers=headers,
                     json={"inputs": {"DELAY_S": [[0.01 + time.time_ns() % 1000 / 1e6]]}})  # fmt: skip
    assert job.status_code == 202, job.text
    job_ws_url = f"{ws_url.removesuffix('/v1/ws')}/v1/jobs/{job.json()['id']}/ws"

    def job_socket() -> None:  # waits on a queued job (no worker runs in this gateway)
        with connect(job_ws_url, additional_headers=headers, open_timeout=10) as ws:
            try:
                while True:
                    ws.recv(timeout=30)
                    answered.add("ws_job")
            except ConnectionClosed as exc:
                outcomes["ws_job"] = (exc.rcvd.code if exc.rcvd else None, time.monotonic())

    threads = [threading.Thread(target=f, daemon=True) for f in (busy_stream, idle_stream, busy_socket,
                                                                    idle_socket, job_socket)]  # fmt: skip
    for t in threads:
        t.start()
    eventually(
        lambda: len(answered) == len(threads), 30, 0.05, lambda: f"open and answered: {sorted(answered)}"
    )
    r = httpx.delete(f"{auth_gateway.http}/v1/admin/keys/{key['id']}",
                     headers={"Authorization": f"Bearer {ADMIN}"})  # fmt: skip
    assert r.status_code == 200
    at = time.monotonic()
    revoked.set()
    for t in threads:
        t.join(timeout=30)
    bound = 5.0 + 2.5  # TGW_AUTH_KEY_CACHE_S=5 and a loaded machine's margin (before: 15+ s, never)
    code, ended, last = outcomes["busy"]
    assert code == grpc.StatusCode.UNAUTHENTICATED and ended - at < bound and last - at < bound, ended - at
    code, ended = outcomes["idle"]
    assert code == grpc.StatusCode.UNAUTHENTICATED and ended - at < bound, ended - at
    code, ended, last = outcomes["ws"]
    assert code == 1008 and ended - at < bound and last - at < bound, ended - at
    code, ended = outcomes["ws_idle"]
    assert code == 1008 and ended - at < bound, ended - at
    code, ended = outcomes["ws_job"]
    assert code == 1008 and ended - at < bound, ended - at


# --- 7: a stream whose answers are not read is not read either --------------------------------------
def test_stream_not_reading_answers_keeps_memory_bounded(gateway: GatewayAddresses) -> None:
    process = psutil.Process()  # the test gateway serves in this process
    payload = np.random.default_rng(7).random((1, 65536), dtype=np.float32)  # 256 KB per request
    sent = [0]
    stop = threading.Event()

    def requests() -> Iterator[Any]:
        for i in range(4000):
            if stop.is_set():
                return
            payload[0, 0] = float(i)  # no cache hit: each answer is a fresh 256 KB
            sent[0] += 1
            yield fp32_request(payload, f"m{i}")

    before = process.memory_info().rss
    with stub_for(gateway.grpc) as stub:
        call = stub.ModelStreamInfer(requests(), timeout=120)
        peak = before
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:  # the answers are not read
            time.sleep(0.5)  # sampling the memory over a fixed 15 s window
            peak = max(peak, process.memory_info().rss)
        taken = sent[0]
        assert (
            httpx.get(gateway.http + "/healthz", timeout=10).status_code == 200
        )  # the gateway stays healthy
        stop.set()
        call.cancel()
    growth = peak - before
    print(f"memory: sent {taken} requests, RSS growth {growth / 1e6:.0f} MB")
    assert taken < 1000, taken  # the gateway stopped reading: the client could not hand its requests on
    assert growth < 400 * 1024 * 1024, growth / 1e6  # 4,000 x 256 KB would be 1 GB (+ the answers)


# --- 19: an undecodable message -----------------------------------------------------------------------
def test_undecodable_message_is_invalid_argument(gateway: GatewayAddresses) -> None:
    garbage = b"\xff\xff\xff\xff\x0f"  # not a protobuf message
    with grpc.insecure_channel(gateway.grpc) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as err:
            infer(garbage, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert "ModelInferRequest" in (err.value.details() or "")
        stream = channel.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")
        with pytest.raises(grpc.RpcError) as err:
            list(stream(iter([garbage]), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value


def test_unhandled_error_log_line_carries_the_request_id_of_the_answer(
    gateway: GatewayAddresses, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fault injected in the gRPC decode step (the real gateway, Triton and Redis): the INTERNAL status
    points to the log by request id, and the log line (the gateway's own handler: JSON, repeat filter)
    carries that id and the traceback; a second, different fault within 10 s is logged in full too."""
    import app.frontends.grpc.codec as codec
    from app.observability.logging import JsonFormatter, RepeatFilter

    real = codec.decode
    faults = {"boom-1": RuntimeError("injected fault"), "boom-2": LookupError("another injected fault")}

    def failing(info: Any, req: Any) -> Any:
        if req.id in faults:
            raise faults[req.id]
        return real(info, req)

    monkeypatch.setattr(codec, "decode", failing)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RepeatFilter(10.0))
    logging.getLogger("app.errors").addHandler(handler)
    ids = []
    try:
        with stub_for(gateway.grpc) as stub:
            for rid in faults:
                call = stub.ModelInfer.with_call
                with pytest.raises(grpc.RpcError) as err:
                    call(fp32_request(np.ones((1, 2), np.float32), rid), timeout=10)
                assert err.value.code() == grpc.StatusCode.INTERNAL
                assert "see the gateway log for this request id" in (err.value.details() or "")
                ids.append(dict(err.value.trailing_metadata() or ())["x-request-id"])
    finally:
        logging.getLogger("app.errors").removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    unhandled = [line for line in lines if line["msg"] == "unhandled error"]
    assert [line["request_id"] for line in unhandled] == ids == ["boom-1", "boom-2"]
    assert "RuntimeError: injected fault" in unhandled[0]["exc"]
    assert "LookupError: another injected fault" in unhandled[1]["exc"]
