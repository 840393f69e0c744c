"""`tgw convert` end to end: convert checkpoints of both example architectures, load the generated CPU
configs in a real Triton (its own server on a fresh repository), infer through the gateway, compare with
PyTorch."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.launcher import EmbeddedRedis, EmbeddedTriton, free_port
from tests.gateway_server import running_gateway

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from training.models import TransformerForecaster, VAEForecaster  # noqa: E402

CASES = {
    "conv_transformer": (TransformerForecaster, "TransformerForecaster", (20, 1), {"num_layers": 2}),
    "conv_vae": (VAEForecaster, "VAEForecaster", (1, 20), {"latent_dim": 16}),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.nn.Module]:
    from app.convert.cli import main as tgw

    repo = tmp_path_factory.mktemp("converted") / "repo"
    models = {}
    for name, (cls, cls_name, shape, cfg) in CASES.items():
        torch.manual_seed(1)
        model = cls(**cfg).eval()
        ckpt = repo.parent / f"{name}.pth"
        torch.save({"state_dict": model.state_dict(), "model_config": cfg}, ckpt)
        argv = ["convert", "--checkpoint", str(ckpt), "--module", str(ROOT / "training" / "models.py"),
                "--model-class", cls_name, "--name", name, "--input-shapes", ",".join(map(str, shape)),
                "--output-shapes", "10", "--output-dir", str(repo), "--max-batch", "64"]  # fmt: skip
        assert tgw(argv) == 0
        models[name] = model
        # The GPU config's runner (app/triton_models/torch_runner.py) on this CPU machine: the same model
        # directory under another name, configs/gpu.pbtxt as its config with the instance on CPU (where
        # the runner runs eager FP32; CUDA graphs and FP16 are checked on the GPU run, docs/performance.md).
        src, dst = repo / name, repo / f"{name}_torch"
        shutil.copytree(src, dst)
        gpu = (src / "configs" / "gpu.pbtxt").read_text()
        assert (
            'string_value: "graphs"' in gpu
            and "KIND_GPU" in gpu
            and 'precision" value: { string_value: "fp16"' in gpu
        )
        shutil.rmtree(dst / "configs")
        (dst / "config.pbtxt").write_text(gpu.replace(f'name: "{name}"', f'name: "{name}_torch"')
                                          .replace("KIND_GPU", "KIND_CPU"))  # fmt: skip
    models["__repo__"] = repo  # type: ignore[assignment]
    return models


@pytest.fixture(scope="module")
def converted_gateway(
    converted: dict[str, torch.nn.Module],
    redis_server: EmbeddedRedis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    server = EmbeddedTriton(
        [converted["__repo__"]],  # type: ignore[list-item]
        http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
        state_dir=tmp_path_factory.mktemp("triton-converted"),
    )  # fmt: skip
    server.start(timeout=180)
    try:
        with running_gateway(triton_url=server.grpc_url, redis_url=redis_server.url) as url:
            yield url
    finally:
        server.stop()


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_model_served_equals_pytorch(
    name: str, converted: dict[str, torch.nn.Module], converted_gateway: str
) -> None:
    _, _, shape, _ = CASES[name]
    x = (np.random.default_rng(7).normal(size=(6, *shape)) * 3 + 1).astype(np.float32)
    with httpx.Client(base_url=converted_gateway, timeout=30) as client:
        info = client.get(f"/v1/models/{name}").json()
        assert info["max_batch_size"] == 64
        r = client.post(f"/v1/models/{name}/infer", json={"inputs": {"series": x.tolist()}})
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"]["forecast"], dtype=np.float32)
    with torch.no_grad():
        ref = converted[name](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_runner_batches_and_matches_onnx(name: str, converted_gateway: str) -> None:
    """Concurrent requests of different batch sizes through the torch runner (merged by Triton's dynamic
    batcher, split back per request) give what the ONNX Runtime config gives for the same rows."""
    from concurrent.futures import ThreadPoolExecutor

    _, _, shape, _ = CASES[name]
    rng = np.random.default_rng(11)
    xs = [(rng.normal(size=(n, *shape)) * 5 + 100).astype(np.float32) for n in (1, 3, 1, 2, 5, 1, 4, 1)]

    def infer(model: str, x: np.ndarray) -> np.ndarray:
        with httpx.Client(base_url=converted_gateway, timeout=30) as client:
            r = client.post(f"/v1/models/{model}/infer", json={"inputs": {"series": x.tolist()}},
                            headers={"Cache-Control": "no-cache, no-store"})  # fmt: skip
        assert r.status_code == 200, r.text
        return np.asarray(r.json()["outputs"]["forecast"], dtype=np.float32)

    with ThreadPoolExecutor(8) as pool:
        torch_out = list(pool.map(lambda x: infer(f"{name}_torch", x), xs))
    onnx_out = [infer(name, x) for x in xs]
    for x, a, b in zip(xs, torch_out, onnx_out, strict=True):
        assert a.shape == (len(x), 10)
        np.testing.assert_allclose(a, b, atol=1e-3, rtol=1e-4)
