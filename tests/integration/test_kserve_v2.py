"""The official ``tritonclient.http`` client, unchanged, against the gateway's /v2 (cache in the path)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from app.launcher import EmbeddedTriton

pytestmark = pytest.mark.integration


@pytest.fixture
def tc(gateway_url: str) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(url=gateway_url.removeprefix("http://"))


def _executions(triton: EmbeddedTriton, model: str) -> int:
    stats = httpx.get(f"{triton.http_url}/v2/models/{model}/stats").json()
    return int(stats["model_stats"][0]["inference_stats"]["success"]["count"])


def test_health_and_metadata(tc: httpclient.InferenceServerClient) -> None:
    assert tc.is_server_live() and tc.is_server_ready()
    assert tc.is_model_ready("identity_fp32")
    assert tc.is_model_ready("versioned_fp32", "1")
    assert not tc.is_model_ready("ghost")
    meta = tc.get_server_metadata()
    assert "binary_tensor_data" in meta["extensions"]
    model = tc.get_model_metadata("identity_fp32")
    assert model["inputs"] == [{"name": "INPUT0", "datatype": "FP32", "shape": [-1, -1]}]
    assert tc.get_model_config("identity_fp32")["max_batch_size"] == 64
    names = {m["name"] for m in tc.get_model_repository_index()}
    assert {"identity_fp32", "typed"} <= names


@pytest.mark.parametrize("binary", [True, False])
def test_infer_through_the_cache(
    tc: httpclient.InferenceServerClient, triton: EmbeddedTriton, binary: bool
) -> None:
    data = np.random.default_rng().standard_normal((3, 5)).astype(np.float32)
    tensor = httpclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data, binary_data=binary)
    out = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)]
    before = _executions(triton, "identity_fp32")
    first = tc.infer("identity_fp32", [tensor], outputs=out, request_id="r-1")
    second = tc.infer("identity_fp32", [tensor], outputs=out)
    assert np.array_equal(first.as_numpy("OUTPUT0"), data)
    assert np.array_equal(second.as_numpy("OUTPUT0"), data)
    assert first.get_response()["id"] == "r-1"
    assert _executions(triton, "identity_fp32") - before == 1  # the second came from the cache


def test_bytes_and_versions(tc: httpclient.InferenceServerClient) -> None:
    inputs = [
        httpclient.InferInput("I8", [2], "INT8"),
        httpclient.InferInput("FLAG", [1], "BOOL"),
        httpclient.InferInput("TEXT", [2], "BYTES"),
        httpclient.InferInput("F16", [2], "FP16"),
    ]
    inputs[0].set_data_from_numpy(np.array([1, 2], dtype=np.int8))
    inputs[1].set_data_from_numpy(np.array([True]))
    inputs[2].set_data_from_numpy(np.array([b"ab", b"cd"], dtype=np.object_))
    inputs[3].set_data_from_numpy(np.array([0.5, 0.25], dtype=np.float16))
    result = tc.infer("typed", inputs)
    assert result.as_numpy("SUM").tolist() == [4.75]
    assert result.as_numpy("TEXT_OUT").tolist() == [b"AB", b"CD"]

    x = httpclient.InferInput("INPUT0", [1, 2], "FP32")
    x.set_data_from_numpy(np.array([[1.0, 2.0]], dtype=np.float32))
    assert tc.infer("versioned_fp32", [x], model_version="1").as_numpy("OUTPUT0").tolist() == [[1.0, 2.0]]
    assert tc.infer("versioned_fp32", [x], model_version="2").as_numpy("OUTPUT0").tolist() == [[2.0, 4.0]]


def test_errors_reach_the_client_as_messages(tc: httpclient.InferenceServerClient) -> None:
    x = httpclient.InferInput("INPUT0", [1, 2, 3], "FP32")
    x.set_data_from_numpy(np.zeros((1, 2, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException) as info:
        tc.infer("identity_fp32", [x])
    assert "expected shape [-1, -1]" in str(info.value)
    with pytest.raises(InferenceServerException) as info:
        tc.get_model_metadata("ghost")
    assert "ghost" in str(info.value)


def test_v2_json_wrong_datatype_and_size(client: httpx.Client) -> None:
    bad_type = {"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "INT32", "data": [1, 2]}]}
    r = client.post("/v2/models/identity_fp32/infer", json=bad_type)
    assert r.status_code == 400 and "expected FP32, got INT32" in r.json()["error"]
    bad_size = {"inputs": [{"name": "INPUT0", "shape": [1, 3], "datatype": "FP32", "data": [1, 2]}]}
    r = client.post("/v2/models/identity_fp32/infer", json=bad_size)
    assert r.status_code == 400 and r.json()["details"]["field"] == "inputs.INPUT0.data"
