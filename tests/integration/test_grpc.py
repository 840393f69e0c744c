"""The gRPC front door with NVIDIA's own clients (``tritonclient.grpc`` sync, aio and streaming) and the raw
generated stub, against the session gateway (real Triton and Redis behind it)."""

from __future__ import annotations

import asyncio
import queue
import signal
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.eventually import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def tc(gateway_grpc: str) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(gateway_grpc)
    yield client
    client.close()


@pytest.fixture
def stub(gateway_grpc: str) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(gateway_grpc) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def fp32_input(name: str, arr: np.ndarray) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(arr.shape), "FP32")
    tensor.set_data_from_numpy(arr)
    return tensor


def trailing(call: Any) -> dict[str, str]:
    return {k: v for k, v in call.trailing_metadata() or ()}


def test_health_and_metadata(tc: grpcclient.InferenceServerClient) -> None:
    assert tc.is_server_live() and tc.is_server_ready()
    assert tc.is_model_ready("identity_fp32") and tc.is_model_ready("versioned_fp32", "2")
    assert not tc.is_model_ready("versioned_fp32", "7") and not tc.is_model_ready("nope")
    server = tc.get_server_metadata(as_json=True)
    assert server["name"] == "triton-gateway" and "binary_tensor_data" in server["extensions"]
    meta = tc.get_model_metadata("versioned_fp32", as_json=True)
    assert meta["versions"] == ["1", "2"]  # every ready version, as Triton lists them
    assert meta["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": ["-1", "2"]}]
    assert tc.get_model_metadata("versioned_fp32", "1", as_json=True)["versions"] == ["1"]  # as Triton
    config = tc.get_model_config("identity_fp32", as_json=True)["config"]
    assert config["name"] == "identity_fp32" and config["max_batch_size"] == 64
    index = tc.get_model_repository_index(as_json=True)["models"]
    assert {"identity_fp32", "repeat_decoupled"} <= {m["name"] for m in index}
    stats = tc.get_inference_statistics("identity_fp32", as_json=True)["model_stats"]
    assert stats[0]["name"] == "identity_fp32"


def test_infer_raw_and_typed_contents(
    tc: grpcclient.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    x = np.random.default_rng().random((2, 5), dtype=np.float32)
    result = tc.infer("identity_fp32", [fp32_input("INPUT0", x)], request_id="grpc-raw-1")
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)
    response = result.get_response()
    assert response.id == "grpc-raw-1" and response.model_name == "identity_fp32"
    assert len(response.raw_output_contents) == 1  # raw_output_contents, as Triton answers

    request = service_pb2.ModelInferRequest(model_name="versioned_fp32", model_version="2", id="typed-1")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1.5, 2.0])
    reply, call = stub.ModelInfer.with_call(request, timeout=10)
    assert reply.model_version == "2" and reply.id == "typed-1"
    out = np.frombuffer(reply.raw_output_contents[0], dtype=np.float32)
    np.testing.assert_array_equal(out, [3.0, 4.0])
    assert trailing(call)["x-request-id"] == "typed-1"


def test_bytes_and_several_datatypes(tc: grpcclient.InferenceServerClient) -> None:
    inputs = []
    for name, arr, datatype in (
        ("I8", np.array([1, 2], dtype=np.int8), "INT8"),
        ("FLAG", np.array([True]), "BOOL"),
        ("TEXT", np.array([b"a", b"bc"], dtype=np.object_), "BYTES"),
        ("F16", np.array([0.5, 0.25], dtype=np.float16), "FP16"),
    ):
        tensor = grpcclient.InferInput(name, list(arr.shape), datatype)
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    result = tc.infer("typed", inputs)
    assert result.as_numpy("TEXT_OUT").tolist() == [b"A", b"BC"]  # the model upper-cases
    assert result.as_numpy("SUM").shape == (1,)


def test_a_request_answered_over_http_is_a_hit_over_grpc_and_back(
    client: httpx.Client, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    row = np.random.default_rng().random(4, dtype=np.float32)

    def grpc_infer(values: np.ndarray) -> tuple[np.ndarray, str]:
        request = service_pb2.ModelInferRequest(model_name="identity_fp32")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(values.tobytes())
        reply, call = stub.ModelInfer.with_call(request, timeout=10)
        return np.frombuffer(reply.raw_output_contents[0], dtype=np.float32), trailing(call)["x-cache"]

    body = {"inputs": [{"name": "INPUT0", "datatype": "FP32", "shape": [1, 4], "data": row.tolist()}]}
    first = client.post("/v2/models/identity_fp32/infer", json=body)
    assert first.status_code == 200 and first.headers["x-cache"] == "MISS"
    out, cache = grpc_infer(row)
    assert cache == "HIT"
    np.testing.assert_array_equal(out, row)

    other = row + 1
    out, cache = grpc_infer(other)
    assert cache == "MISS"
    again = client.post(
        "/v1/models/identity_fp32/infer", json={"inputs": {"INPUT0": [other.tolist()]}}
    )  # /v1 too: one key space for every front door
    assert again.headers["x-cache"] == "HIT"
    np.testing.assert_allclose(again.json()["outputs"]["OUTPUT0"], [other.tolist()])


def test_errors_use_tritons_status_codes(
    tc: grpcclient.InferenceServerClient, stub: service_pb2_grpc.GRPCInferenceServiceStub, triton: Any
) -> None:
    with pytest.raises(InferenceServerException) as err:
        tc.infer("nope", [fp32_input("INPUT0", np.zeros((1, 2), np.float32))])
    assert err.value.status() == "StatusCode.NOT_FOUND" and "nope" in err.value.message()

    with pytest.raises(InferenceServerException) as err:
        tc.infer("versioned_fp32", [fp32_input("INPUT0", np.zeros((1, 3), np.float32))])
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "inputs.INPUT0" in err.value.message() and "[-1, 2]" in err.value.message()

    negative = [fp32_input("INPUT0", np.array([[-1.0]], np.float32))]
    direct = grpcclient.InferenceServerClient(triton.grpc_url)
    with pytest.raises(InferenceServerException) as triton_err:
        direct.infer("reject_fp32", negative)
    direct.close()
    with pytest.raises(InferenceServerException) as err:  # the model's refusal keeps Triton's status
        tc.infer("reject_fp32", negative)
    assert err.value.status() == triton_err.value.status()
    assert "negative values refused" in err.value.message()

    request = service_pb2.ModelInferRequest(model_name="identity_fp32")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.extend([b"\0" * 8, b"\0" * 8])
    with pytest.raises(grpc.RpcError) as rpc_err:
        stub.ModelInfer(request, timeout=10)
    assert rpc_err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in rpc_err.value.details()


def test_deadline_exceeded(tc: grpcclient.InferenceServerClient) -> None:
    # A delay no other test asks for: the session's Redis is shared, so a 1.5 s answer another module's
    # gateway cached would come back at once.
    delay = 1.5 + (time.time_ns() % 997) / 1e5
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as err:
        tc.infer("sleep_fp32", [fp32_input("DELAY_S", np.array([[delay]], np.float32))], client_timeout=0.3)
    assert err.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert time.monotonic() - start < 1.4


def test_refused_rpcs_say_why(tc: grpcclient.InferenceServerClient) -> None:
    for call, code in (
        (lambda: tc.load_model("identity_fp32"), "PERMISSION_DENIED"),
        (lambda: tc.unload_model("identity_fp32"), "PERMISSION_DENIED"),
        (lambda: tc.get_system_shared_memory_status(), "UNIMPLEMENTED"),
        (lambda: tc.register_cuda_shared_memory("r", b"", 0, 8), "UNIMPLEMENTED"),
        (lambda: tc.get_trace_settings(), "PERMISSION_DENIED"),
        (lambda: tc.update_log_settings({"log_verbose_level": 1}), "PERMISSION_DENIED"),
    ):
        with pytest.raises(InferenceServerException) as err:
            call()
        assert err.value.status() == f"StatusCode.{code}"
        assert "gateway" in err.value.message()


def test_streaming_answers_in_order_and_streams_decoupled_models(gateway_grpc: str) -> None:
    results: queue.Queue[tuple[Any, Any]] = queue.Queue()
    got: list[Any] = []
    client = grpcclient.InferenceServerClient(gateway_grpc)
    try:
        client.start_stream(callback=lambda result, error: results.put((result, error)))
        for i, delay in enumerate((0.3, 0.0, 0.1)):  # answered in request order, whatever the latency
            client.async_stream_infer(
                "sleep_fp32", [fp32_input("DELAY_S", np.array([[delay]], np.float32))], request_id=f"s{i}"
            )
        count = grpcclient.InferInput("COUNT", [1], "INT32")
        count.set_data_from_numpy(np.array([3], dtype=np.int32))
        client.async_stream_infer("repeat_decoupled", [count], request_id="d")
        client.async_stream_infer("nope", [count], request_id="bad")
        while len(got) < 3 + 3 + 1:
            got.append(results.get(timeout=10))
    finally:
        client.stop_stream(cancel_requests=len(got) < 3 + 3 + 1)  # never wait on a stream cut short
        client.close()
    ordinary = [r.get_response().id for r, e in got if r is not None and r.get_response().id.startswith("s")]
    assert ordinary == ["s0", "s1", "s2"]
    decoupled = [int(r.as_numpy("OUT")[0]) for r, e in got if r is not None and r.get_response().id == "d"]
    assert decoupled == [0, 1, 2]
    errors = [e for r, e in got if e is not None]
    assert len(errors) == 1 and "nope" in errors[0].message()


def test_aio_client_and_metrics(gateway_grpc: str, client: httpx.Client) -> None:
    def count() -> float:
        text = client.get("/metrics").text
        line = 'tgw_grpc_requests_total{code="OK",method="ModelInfer"}'
        return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line))

    before = count()

    async def run() -> list[np.ndarray]:
        aclient = grpcaio.InferenceServerClient(gateway_grpc)
        try:
            assert await aclient.is_server_ready()
            calls = []
            for i in range(4):
                tensor = grpcaio.InferInput("INPUT0", [1, 3], "FP32")
                tensor.set_data_from_numpy(np.full((1, 3), i, np.float32))
                calls.append(aclient.infer("identity_fp32", [tensor]))
            return [r.as_numpy("OUTPUT0") for r in await asyncio.gather(*calls)]
        finally:
            await aclient.close()

    outs = asyncio.run(asyncio.wait_for(run(), 20))
    assert [o.tolist() for o in outs] == [[[float(i)] * 3] for i in range(4)]
    assert count() - before == 4


def test_sigterm_drains_grpc(triton: Any, redis_server: Any, tmp_path: Any) -> None:
    """SIGTERM: ServerReady turns false at once, a call in flight still gets its answer, the process
    exits 0 and the port closes."""
    from app.launcher import free_port
    from tests.integration.test_operations import serve

    port = free_port()
    env = {"TGW_GRPC_PORT": str(port), "TGW_SHUTDOWN_DELAY_S": "0.5", "TGW_DRAIN_S": "10"}
    with serve(triton, redis_server, tmp_path, **env) as tgw:
        proc, log = tgw.proc, tgw.log
        address = f"127.0.0.1:{port}"
        client = grpcclient.InferenceServerClient(address)
        assert client.is_server_ready()
        delay = 1.5 + float(np.random.default_rng().integers(1, 1000)) / 1e6  # never a cache hit
        done: queue.Queue[Any] = queue.Queue()
        client.async_infer("sleep_fp32", [fp32_input("DELAY_S", np.array([[delay]], np.float32))],
                           callback=lambda result, error: done.put((result, error)))  # fmt: skip
        time.sleep(0.3)  # a real wait: the call is under way before the signal
        proc.send_signal(signal.SIGTERM)
        eventually(lambda: not grpcclient.InferenceServerClient(address).is_server_ready(), 0.3, 0.02,
                   "ServerReady still true 0.3 s after SIGTERM")  # fmt: skip
        result, error = done.get(timeout=15)
        assert error is None and result.as_numpy("SLEPT_S")[0, 0] == pytest.approx(delay, rel=1e-5)
        assert proc.wait(timeout=30) == 0, log.read_text()[-2000:]
        client.close()
    with pytest.raises(InferenceServerException):
        grpcclient.InferenceServerClient(address).is_server_live()


def test_api_keys_over_grpc(triton: Any, redis_server: Any) -> None:
    """TGW_AUTH=required: the key comes from the call metadata as from HTTP headers; health is open,
    inference needs a key, the repository index an admin credential, limits answer RESOURCE_EXHAUSTED."""
    from tests.gateway_server import running_gateway_addresses
    from tests.integration.test_auth import ADMIN, auth_settings, make_key

    with running_gateway_addresses(**auth_settings(triton, redis_server.url)) as gw:
        key = make_key(gw.http, rps=0.01, burst=3)["key"]
        client = grpcclient.InferenceServerClient(gw.grpc)
        try:
            assert client.is_server_live() and client.is_server_ready()  # open, as /v2/health
            tensor = [fp32_input("INPUT0", np.array([[1.0, 2.0]], np.float32))]
            with pytest.raises(InferenceServerException) as err:
                client.infer("versioned_fp32", tensor)
            assert err.value.status() == "StatusCode.UNAUTHENTICATED"
            with pytest.raises(InferenceServerException) as err:
                client.infer("versioned_fp32", tensor, headers={"authorization": "Bearer tgw_nope"})
            assert err.value.status() == "StatusCode.UNAUTHENTICATED"
            auth = {"authorization": f"Bearer {key}"}
            out = client.infer("versioned_fp32", tensor, headers=auth).as_numpy("OUTPUT0")
            assert out.tolist() == [[2.0, 4.0]]
            with pytest.raises(InferenceServerException) as err:
                client.get_model_repository_index(headers=auth)
            assert err.value.status() == "StatusCode.PERMISSION_DENIED"
            admin = {"authorization": f"Bearer {ADMIN}"}
            assert client.get_model_repository_index(headers=admin, as_json=True)["models"]
            statuses = []
            for _ in range(4):
                try:
                    client.infer("versioned_fp32", tensor, headers=auth)
                    statuses.append("OK")
                except InferenceServerException as exc:
                    statuses.append(str(exc.status()))
            assert statuses[-1] == "StatusCode.RESOURCE_EXHAUSTED", statuses
        finally:
            client.close()
