"""The GPU configs' answers against the CPU ONNX answers (scripts/gpu/run.sh runs this on the GPU machine).

Starts the embedded Triton with ``--model-config-name`` (default ``auto``: ``gpu`` on a GPU) loading the two
example models, sends windows through its HTTP endpoint one request at a time (batches 1, 3, 37, 128:
padded buckets) and 64 single-row requests at once (merged by the dynamic batcher), and compares every row
with ONNX Runtime on ``<version>/model.onnx`` (CPU).

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
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.launcher import EmbeddedTriton, free_port  # noqa: E402

MODELS = {"transformer_timeseries": ((20, 1), [1]), "vae_timeseries": ((1, 20), [1, 2])}
REL, ABS = 0.01, 1e-3


def infer(url: str, model: str, version: int, x: np.ndarray) -> np.ndarray:
    body = {
        "inputs": [
            {"name": "series", "shape": list(x.shape), "datatype": "FP32", "data": x.reshape(-1).tolist()}
        ]
    }
    req = urllib.request.Request(
        f"{url}/v2/models/{model}/versions/{version}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        out = json.loads(resp.read())["outputs"][0]
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


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
        extra_args=["--model-control-mode=explicit", *(f"--load-model={m}" for m in MODELS)],
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
    finally:
        server.stop()
    print(
        f"parity: {'all rows within' if ok_all else 'FAILED:'} |gpu-onnx| <= {REL} * std(input row) + {ABS}"
    )
    return 0 if ok_all else 1


if __name__ == "__main__":
    raise SystemExit(main())
