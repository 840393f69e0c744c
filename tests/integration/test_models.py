"""The shipped example models through the real gateway and the real Triton (CPU configs, ONNX Runtime):
outputs equal PyTorch on the committed checkpoints, versions are served and cached apart, and the
`forecast` ensemble answers a raw series."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CKPT = ROOT / "training" / "checkpoints"


REPO = ROOT / "model_repository"
# checkpoint -> the ONNX file tgw convert made from it
ONNX = {
    "transformer.pth": REPO / "transformer_timeseries" / "1" / "model.onnx",
    "vae_step1000.pth": REPO / "vae_timeseries" / "1" / "model.onnx",
    "vae.pth": REPO / "vae_timeseries" / "2" / "model.onnx",
}


def reference(name: str, x: np.ndarray) -> np.ndarray:
    """PyTorch on the committed checkpoint (the `models` extra); without torch, ONNX Runtime on the
    committed ONNX file (which tests/unit/test_convert.py ties to PyTorch where torch is installed)."""
    try:
        import torch
    except ImportError:
        import onnxruntime as ort

        session = ort.InferenceSession(str(ONNX[name]), providers=["CPUExecutionProvider"])
        return np.asarray(session.run(["forecast"], {"series": x})[0])
    sys.path.insert(0, str(ROOT))
    from training.models import TransformerForecaster, VAEForecaster

    cls = TransformerForecaster if name.startswith("transformer") else VAEForecaster
    ckpt = torch.load(CKPT / name, weights_only=True)
    model = cls(**ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    with torch.no_grad():
        return np.asarray(model.eval()(torch.from_numpy(x)).numpy())


def windows(n: int, shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(random.randrange(1 << 30))  # fresh values: cache MISS first
    t = np.arange(20)[None, :] + rng.uniform(0, 50, size=(n, 1))
    x = rng.uniform(0.5, 3, (n, 1)) * np.sin(2 * np.pi * t / rng.uniform(5, 20, (n, 1))) + rng.uniform(
        -5, 5, (n, 1)
    )
    return x.astype(np.float32).reshape(n, *shape)


def infer(client: httpx.Client, url: str, inputs: dict[str, Any]) -> httpx.Response:
    return client.post(url, json={"inputs": inputs})


def test_transformer_through_gateway_equals_pytorch(client: httpx.Client) -> None:
    x = windows(5, (20, 1))
    r = infer(client, "/v1/models/transformer_timeseries/infer", {"series": x.tolist()})
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"]["forecast"], dtype=np.float32)
    assert got.shape == (5, 10)
    np.testing.assert_allclose(got, reference("transformer.pth", x), atol=1e-4, rtol=1e-4)


def test_sine_forecast_through_gateway(client: httpx.Client) -> None:
    t = np.arange(30)
    s = np.sin(2 * np.pi * t / 10)
    for model, shape in (("transformer_timeseries", (1, 20, 1)), ("vae_timeseries", (1, 1, 20))):
        r = infer(client, f"/v1/models/{model}/infer", {"series": s[:20].reshape(shape).tolist()})
        assert r.status_code == 200, r.text
        pred = np.asarray(r.json()["outputs"]["forecast"])[0]
        assert np.abs(pred - s[20:]).mean() < 0.15, model


def test_vae_versions_served_and_cached_apart(client: httpx.Client) -> None:
    x = windows(3, (1, 20))
    body = {"series": x.tolist()}
    v1 = infer(client, "/v1/models/vae_timeseries/versions/1/infer", body)
    v2 = infer(client, "/v1/models/vae_timeseries/versions/2/infer", body)
    latest = infer(client, "/v1/models/vae_timeseries/infer", body)
    assert v1.status_code == v2.status_code == latest.status_code == 200, (v1.text, v2.text)
    assert v1.headers["x-cache"] == "MISS" and v2.headers["x-cache"] == "MISS"
    assert v1.json()["model_version"] == "1" and v2.json()["model_version"] == "2"
    out1 = np.asarray(v1.json()["outputs"]["forecast"], dtype=np.float32)
    out2 = np.asarray(v2.json()["outputs"]["forecast"], dtype=np.float32)
    assert not np.allclose(out1, out2)  # two different trained versions
    np.testing.assert_allclose(out1, reference("vae_step1000.pth", x), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out2, reference("vae.pth", x), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(latest.json()["outputs"]["forecast"]), out2, atol=1e-6)
    again = infer(client, "/v1/models/vae_timeseries/versions/1/infer", body)
    assert again.headers["x-cache"] == "HIT" and again.json() == v1.json()
    detail = client.get("/v1/models/vae_timeseries").json()
    assert detail["versions"] == ["1", "2"]


def test_forecast_ensemble_answers_a_raw_series(client: httpx.Client) -> None:
    t = np.arange(47)
    series = (40 + 6 * np.sin(2 * np.pi * t / 12) + 0.1 * t).astype(np.float32)
    r = infer(client, "/v1/models/forecast/infer", {"series": series.tolist()})
    assert r.status_code == 200, r.text
    out = np.asarray(r.json()["outputs"]["forecast"], dtype=np.float32)
    assert out.shape == (10,)
    # same as the transformer on the last 20 raw points (it is scale/shift-equivariant)
    direct = infer(
        client, "/v1/models/transformer_timeseries/infer", {"series": series[-20:].reshape(1, 20, 1).tolist()}
    )
    assert direct.status_code == 200, direct.text
    ref = np.asarray(direct.json()["outputs"]["forecast"], dtype=np.float32)[0]
    np.testing.assert_allclose(out, ref, atol=2e-3, rtol=1e-4)
    future = 40 + 6 * np.sin(2 * np.pi * np.arange(47, 57) / 12) + 0.1 * np.arange(47, 57)
    assert np.abs(out - future).mean() < np.abs(series[-1] - future).mean()  # beats last-value
    short = infer(client, "/v1/models/forecast/infer", {"series": series.tolist(), "horizon": [4]})
    assert short.status_code == 200, short.text
    np.testing.assert_allclose(np.asarray(short.json()["outputs"]["forecast"]), out[:4], atol=1e-5)


def test_forecast_ensemble_rejects_bad_input(client: httpx.Client) -> None:
    # Triton's own invalid-argument rejection is the client's error: 400 with Triton's message, not 502.
    r = infer(client, "/v1/models/forecast/infer", {"series": [1.0] * 19})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "triton_rejected_input" and "at least 20 points" in r.text
    for horizon in (0, -1, 11, 1000):
        r = infer(client, "/v1/models/forecast/infer", {"series": [1.0] * 25, "horizon": [horizon]})
        assert r.status_code == 400 and "between 1 and 10" in r.text, (horizon, r.text)
