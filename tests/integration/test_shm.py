"""TGW_TRITON_SHM against the real Triton: large inputs and outputs travel through registered POSIX
shared-memory regions (``system``; ``cuda`` where a GPU and cuda-bindings are there), answers are right,
regions never leak and two gateways never share one."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import shared_memory as shm

from app.launcher import EmbeddedTriton
from tests.integration.conftest import GatewayFactory

pytestmark = pytest.mark.integration
SHM = Path("/dev/shm")
SETTINGS = {"triton_shm": "system", "shm_min_bytes": 64 * 1024, "shm_regions": 2, "cache_enabled": False}


def ours() -> set[str]:
    return {p.name for p in SHM.glob(f"tgw_shm_{os.getpid()}_*")}


def registered(triton: EmbeddedTriton, kind: str = "system") -> set[str]:
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        if kind == "cuda":
            status = client.get_cuda_shared_memory_status(as_json=True)
        else:
            status = client.get_system_shared_memory_status(as_json=True)
    finally:
        client.close()
    return set(status.get("regions", {}))


def infer(url: str, image: np.ndarray) -> dict[str, np.ndarray]:
    with httpx.Client(base_url=url, timeout=60) as c:
        r = c.post("/v1/models/image_fp32/infer", json={"inputs": {"IMAGE": image.tolist()}})
    assert r.status_code == 200, r.text
    return {k: np.asarray(v, np.float32) for k, v in r.json()["outputs"].items()}


def test_large_inputs_go_through_shared_memory_and_nothing_leaks(
    triton: EmbeddedTriton, start_gateway: GatewayFactory
) -> None:
    # what a gateway killed earlier left behind: a region file and its registration, owner pid gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    leftover = f"tgw_shm_{dead}_deadbeef_0"
    handle = shm.create_shared_memory_region(leftover, "/" + leftover, 4096)
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    client.register_system_shared_memory(leftover, "/" + leftover, 4096)
    client.close()
    assert leftover in registered(triton)
    del handle  # the mapping only; the file stays, as after a crash

    before = ours()
    image = np.random.default_rng(5).normal(size=(1, 3, 224, 224)).astype(np.float32)
    with start_gateway(**SETTINGS) as url, start_gateway(**SETTINGS):
        # two gateways (same process here): 2 regions each, none shared
        mine = ours() - before
        assert len(mine) == 4 and len({n.rsplit("_", 2)[1] for n in mine}) == 2
        assert mine <= registered(triton)
        # the dead gateway's region is gone from /dev/shm and from Triton
        assert not (SHM / leftover).exists() and leftover not in registered(triton)
        got = infer(url, image)
        np.testing.assert_allclose(got["MEAN"], image.reshape(1, 3, -1).mean(axis=2), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got["NEG"], -image)
        # both went through a region: one of ours holds the image at offset 0 and Triton's answer (the
        # large output NEG, 64-byte aligned after it) at 602,112; the 12-byte MEAN came over the socket
        raw, neg = image.tobytes(), (-image).tobytes()
        assert any(
            (b := (SHM / n).read_bytes())[: len(raw)] == raw and b[len(raw) : 2 * len(raw)] == neg
            for n in mine
        )
        small = np.ones((1, 3, 224, 224), np.float32)  # same path, other values
        got = infer(url, small)
        np.testing.assert_allclose(got["MEAN"], np.ones((1, 3)), rtol=1e-6)
        np.testing.assert_array_equal(got["NEG"], -small)
    assert ours() == before  # unlinked at stop
    assert not (mine & registered(triton))  # and unregistered


def _cuda_missing() -> str | None:
    if importlib.util.find_spec("cuda") is None or importlib.util.find_spec("cuda.bindings") is None:
        return "cuda-bindings is not installed (TGW_TRITON_SHM=cuda needs it and a GPU)"
    from cuda.bindings import runtime

    err, count = runtime.cudaGetDeviceCount()
    return None if err == runtime.cudaError_t.cudaSuccess and count > 0 else "no GPU visible"


@pytest.mark.skipif(_cuda_missing() is not None, reason=str(_cuda_missing()))
def test_cuda_shared_memory_inputs_and_outputs(triton: EmbeddedTriton, start_gateway: GatewayFactory) -> None:
    before = registered(triton, "cuda")
    image = np.random.default_rng(6).normal(size=(2, 3, 224, 224)).astype(np.float32)
    with start_gateway(**{**SETTINGS, "triton_shm": "cuda"}) as url:
        mine = registered(triton, "cuda") - before
        assert len(mine) == 2 and all(n.startswith(f"tgw_shm_{os.getpid()}_") for n in mine)
        got = infer(url, image)
        np.testing.assert_allclose(got["MEAN"], image.reshape(2, 3, -1).mean(axis=2), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(got["NEG"], -image)
    assert not (mine & registered(triton, "cuda"))  # unregistered (and freed) at stop
