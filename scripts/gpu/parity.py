"""The GPU configs' answers against the CPU ONNX answers (scripts/gpu/run.sh runs this on the GPU machine).

Starts the embedded Triton with ``--model-config-name`` (default ``auto``: ``gpu`` on a GPU) loading the two
example models, sends windows through its HTTP endpoint one request at a time (batches 1, 3, 37, 128:
padded buckets) and 64 single-row requests at once (merged by the dynamic batcher), and compares every row
with ONNX Runtime on ``<version>/model.onnx`` (CPU). Then the ``forecast`` ensemble (its Python steps pass
tensors by DLPack where numpy 2 is installed, as on the GPU image) against the same pre-process, ONNX
transformer and post-process computed here, and ``forecast_stream``'s first ten responses against the
ensemble's answer for the same series.

Tolerance (FP16 autocast; stated in docs/performance.md): per row, max |GPU - ONNX| <= 0.01 * std(row's
input) + 1e-3, i.e. 1 % of the window's own spread (the models are scale-equivariant: a window of values
around 1000 with spread 50 may differ by 0.5). Measured on CPU with torch's FP16 autocast: ~0.3 %.
Exit code 1 when a row is outside it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.launcher import EmbeddedTriton, free_port  # noqa: E402

MODELS = {"transformer_timeseries": ((20, 1), [1]), "vae_timeseries": ((1, 20), [1, 2])}
PIPELINE = ("forecast", "forecast_preprocess", "forecast_postprocess", "forecast_stream")
REL, ABS = 0.01, 1e-3


def post(url: str, path: str, body: dict[str, object]) -> bytes:
    req = urllib.request.Request(
        f"{url}{path}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return bytes(resp.read())


def infer(url: str, model: str, version: int, x: np.ndarray) -> np.ndarray:
    body = {
        "inputs": [
            {"name": "series", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}
        ]
    }
    out = json.loads(post(url, f"/v2/models/{model}/versions/{version}/infer", body))["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def check_forecast(url: str, rng: np.random.Generator) -> bool:
    """The ensemble against pre-process -> ONNX -> post-process here; the stream's first chunk against the
    ensemble. Tolerance as above, on the spread of the 20 points the forecast starts from."""
    import onnxruntime as ort

    from app.triton_models.forecast import postprocess, preprocess

    onnx = ROOT / "model_repository" / "transformer_timeseries" / "1" / "model.onnx"
    sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    ok_all = True
    for n, scale, offset, horizon in [(20, 1, 0, 10), (57, 5, 100, 4), (300, 50, 1000, 10)]:
        series = (rng.normal(size=n) * scale + offset + np.linspace(0, scale, n)).astype(np.float32)
        body = {"inputs": [
            {"name": "series", "shape": [n], "datatype": "FP32", "data": series.tolist()},
            {"name": "horizon", "shape": [1], "datatype": "INT32", "data": [horizon]},
        ]}  # fmt: skip
        try:
            out = json.loads(post(url, "/v2/models/forecast/infer", body))["outputs"][0]
        except urllib.error.HTTPError as exc:
            print(f"parity forecast (ensemble) n={n:3d} FAIL: HTTP {exc.code} {exc.read()[:200]!r}")
            ok_all = False
            continue
        got = np.asarray(out["data"], dtype=np.float32)
        window, scale_out, h = preprocess(series, np.array([horizon], np.int32))
        ref = postprocess(sess.run(["forecast"], {"series": window})[0], scale_out, h)
        spread = float(series[-20:].std())
        err = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
        ok = err <= REL * spread + ABS
        stream_body = {"series": series.tolist(), "horizon": 10}
        events = post(url, "/v2/models/forecast_stream/generate_stream", stream_body).decode().splitlines()
        values = [json.loads(line[5:])["value"] for line in events if line.startswith("data:")]
        chunk = np.asarray(values[:horizon], dtype=np.float32).reshape(-1)
        serr = float(np.abs(chunk - got).max()) if chunk.shape == got.shape else float("inf")
        sok = serr <= REL * spread + ABS
        ok_all &= ok and sok
        print(
            f"parity forecast (ensemble) n={n:3d} h={horizon:2d} {list(got.shape)} max |gpu-onnx| {err:.4g}  "
            f"{'ok' if ok else 'FAIL'}; forecast_stream's first {horizon} vs the ensemble {serr:.4g}  "
            f"{'ok' if sok else 'FAIL'}"
        )
    return ok_all


def check(got: np.ndarray, ref: np.ndarray, x: np.ndarray) -> tuple[float, float, bool]:
    spread = x.reshape(len(x), -1).std(axis=1)
    err = np.abs(got - ref).max(axis=1)
    rel = err / np.maximum(spread, 1e-6)
    return float(err.max()), float(rel.max()), bool(np.all(err <= REL * spread + ABS))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--config-name", default="auto")
    args = p.parse_args()
    import onnxruntime as ort

    state = Path(tempfile.mkdtemp(prefix="tgw-parity-"))
    server = EmbeddedTriton(
        [ROOT / "model_repository"],
        free_port(),
        free_port(),
        free_port(),
        state,
        model_config_name=args.config_name,
        extra_args=["--model-control-mode=explicit", *(f"--load-model={m}" for m in (*MODELS, *PIPELINE))],
    )
    t0 = time.monotonic()
    server.start(timeout=300)
    print(f"parity: Triton with configs {server.model_config_name!r} ready in {time.monotonic() - t0:.1f} s")
    ok_all = True
    rng = np.random.default_rng(3)
    try:
        for model, (shape, versions) in MODELS.items():
            for v in versions:
                sess = ort.InferenceSession(
                    str(ROOT / "model_repository" / model / str(v) / "model.onnx"),
                    providers=["CPUExecutionProvider"],
                )
                cases = []
                for n, scale, offset in [(1, 1, 0), (3, 5, 100), (37, 1, 0), (128, 50, 1000)]:
                    x = (rng.normal(size=(n, *shape)) * scale + offset).astype(np.float32)
                    cases.append(
                        (f"batch {n:3d} (x*{scale}+{offset})", x, infer(server.http_url, model, v, x))
                    )
                xs = [(rng.normal(size=(1, *shape)) * 3 + 10).astype(np.float32) for _ in range(64)]
                with ThreadPoolExecutor(64) as pool:
                    outs = list(pool.map(lambda x: infer(server.http_url, model, v, x), xs))  # noqa: B023
                cases.append(("64 concurrent rows", np.concatenate(xs), np.concatenate(outs)))
                for label, x, got in cases:
                    ref = sess.run(["forecast"], {"series": x})[0]
                    err, rel, ok = check(got, ref, x)
                    ok_all &= ok
                    print(
                        f"parity {model} v{v} {label:<24} max |gpu-onnx| {err:.4g}  "
                        f"max err/std(input) {rel:.4f}  {'ok' if ok else 'FAIL'}"
                    )
        ok_all &= check_forecast(server.http_url, rng)
    finally:
        server.stop()
    print(
        f"parity: {'all rows within' if ok_all else 'FAILED:'} |gpu-onnx| <= {REL} * std(input row) + {ABS}"
    )
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
