"""`tgw convert`: export + parity for both example architectures, the files it writes, bad input (exit 2),
the ONNX runner outside Triton, and a tiny training smoke run. Needs the `models` extra (torch)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")

from app.convert.cli import main as tgw  # noqa: E402
from app.convert.configs import parse_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "training" / "models.py"
sys.path.insert(0, str(ROOT))
from training.models import TransformerForecaster, VAEForecaster  # noqa: E402

ARCHS = {
    "TransformerForecaster": (TransformerForecaster, (20, 1)),
    "VAEForecaster": (VAEForecaster, (1, 20)),
}


def checkpoint(tmp_path: Path, cls_name: str, **config: Any) -> Path:
    torch.manual_seed(0)
    cls, _ = ARCHS[cls_name]
    model = cls(**config)
    path = tmp_path / f"{cls_name}.pth"
    torch.save({"state_dict": model.state_dict(), "model_config": config}, path)
    return path


def convert(ckpt: Path, cls_name: str, out: Path, *extra: str) -> list[str]:
    shape = ",".join(str(d) for d in ARCHS[cls_name][1])
    return ["convert", "--checkpoint", str(ckpt), "--module", str(MODULE), "--model-class", cls_name,
            "--name", "m", "--input-shapes", shape, "--output-shapes", "10", "--output-dir", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize("cls_name", sorted(ARCHS))
def test_convert_writes_a_model_dir_matching_pytorch(
    cls_name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = checkpoint(tmp_path, cls_name)
    out = tmp_path / "repo"
    assert tgw(convert(ckpt, cls_name, out, "--max-batch", "64", "--priority-levels", "2")) == 0
    log = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in log
    assert "max abs error" in log and "trtexec --onnx=" in log and "NOT built" in log
    mdir = out / "m"
    assert {p.name for p in (mdir / "1").iterdir()} == {
        "model.onnx",
        "model.py",
        "model.pt",
        "model_torch.py",
    }
    assert {p.name for p in (mdir / "configs").iterdir()} == {
        "cpu.pbtxt", "gpu.pbtxt", "gpu_eager.pbtxt", "gpu_nobatch.pbtxt", "gpu_eager_nobatch.pbtxt"}  # fmt: skip
    assert parse_config((mdir / "configs/gpu.pbtxt").read_text()).max_batch_size == 64
    trt, cpu = (
        parse_config((mdir / "config.pbtxt").read_text()),
        parse_config((mdir / "configs/cpu.pbtxt").read_text()),
    )
    assert trt.platform == "tensorrt_plan" and trt.max_batch_size == 64 and cpu.backend == "python"
    assert trt.dynamic_batching.priority_levels == 2
    assert "--maxShapes=series:64x" in (mdir / "build_plan.sh").read_text()
    # the written ONNX equals PyTorch on the checkpoint, batch 1 and max, with a dynamic batch axis
    cls, shape = ARCHS[cls_name]
    model = cls()
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    model.eval()
    session = ort.InferenceSession(str(mdir / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].name == "series" and session.get_outputs()[0].name == "forecast"
    for batch in (1, 64, 100):
        x = np.random.default_rng(batch).normal(size=(batch, *shape)).astype(np.float32) * 4 + 2
        got = session.run(["forecast"], {"series": x})[0]
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
            traced = torch.jit.load(str(mdir / "1" / "model.pt"))(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(traced, ref, atol=1e-5, rtol=1e-5)  # the GPU configs' TorchScript


def test_second_version_and_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = checkpoint(tmp_path, "VAEForecaster", latent_dim=8, hidden=16, channels=4)
    out = tmp_path / "repo"
    assert tgw(convert(ckpt, "VAEForecaster", out, "--skip-tensorrt")) == 0
    assert tgw(convert(ckpt, "VAEForecaster", out, "--version", "2")) == 2
    assert "already exists (use --force" in capsys.readouterr().err
    assert (
        tgw(convert(ckpt, "VAEForecaster", out, "--version", "2", "--version-policy", "all", "--force")) == 0
    )
    cfg = parse_config((out / "m" / "configs" / "cpu.pbtxt").read_text())
    assert list(cfg.version_policy.specific.versions) == [1, 2]
    assert (out / "m" / "1" / "model.onnx").is_file() and (out / "m" / "2" / "model.onnx").is_file()


def test_bad_input_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = checkpoint(tmp_path, "TransformerForecaster", num_layers=1, d_model=16, nhead=2, dim_ff=16)
    out = tmp_path / "repo"

    def err(argv: list[str]) -> str:
        assert tgw(argv) == 2
        return capsys.readouterr().err

    cases = [
        (convert(tmp_path / "nope.pth", "TransformerForecaster", out), "checkpoint not found"),
        ([*convert(ckpt, "TransformerForecaster", out)[:6], "Nope", *convert(ckpt, "TransformerForecaster", out)[7:]],
         "class 'Nope' not found"),
        (convert(ckpt, "TransformerForecaster", out, "--input-dtypes", "complex64"), "unknown dtype"),
        (convert(ckpt, "TransformerForecaster", out, "--min-batch", "8", "--opt-batch", "4"), "min <= opt <= max"),
        (convert(ckpt, "TransformerForecaster", out, "--int8"), "--calib-data"),
        (convert(ckpt, "TransformerForecaster", out, "--int8", "--calib-data", str(tmp_path / "c.npy")),
         "calibration data not found"),
    ]  # fmt: skip
    for argv, msg in cases:
        assert msg in err(argv), argv
    # state_dict keys that don't match: listed
    state = torch.load(ckpt, weights_only=True)
    state["state_dict"]["extra.weight"] = torch.zeros(1)
    del state["state_dict"]["skip.bias"]
    bad = tmp_path / "bad.pth"
    torch.save(state, bad)
    msg = err(convert(bad, "TransformerForecaster", out))
    assert "missing keys (1): skip.bias" in msg and "unexpected keys (1): extra.weight" in msg
    # shapes that don't match the model's forward (input) or its output
    argv = convert(ckpt, "TransformerForecaster", out)
    argv[argv.index("--input-shapes") + 1] = "30,1"
    assert "forward fails on the declared input shapes" in err(argv)
    argv = convert(ckpt, "TransformerForecaster", out)
    argv[argv.index("--output-shapes") + 1] = "12"
    assert "returns shape [2, 10]" in err(argv)
    # a checkpoint with the wrong model_config for the weights
    state = torch.load(ckpt, weights_only=True)
    state["model_config"]["d_model"] = 32
    torch.save(state, bad)
    assert "shape mismatches" in err(convert(bad, "TransformerForecaster", out))
    assert not out.exists()  # nothing written by any failure
    (out / "m").mkdir(parents=True)
    assert "already exists" in err(convert(ckpt, "TransformerForecaster", out))


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, array

    def as_numpy(self) -> np.ndarray:
        return self.array


def fake_pb_utils() -> SimpleNamespace:
    class TritonError(Exception):
        INVALID_ARG = 3

        def __init__(self, msg: str, code: int | None = None) -> None:
            super().__init__(msg)
            self.code = code

    return SimpleNamespace(
        Tensor=FakeTensor,
        TritonError=TritonError,
        InferenceResponse=lambda output_tensors=None, error=None: SimpleNamespace(
            outputs=output_tensors, error=error
        ),
        get_input_tensor_by_name=lambda req, name: req.get(name),
    )


def test_onnx_runner_batches_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.triton_models import onnx_runner

    ckpt = checkpoint(tmp_path, "TransformerForecaster", num_layers=1)
    assert tgw(convert(ckpt, "TransformerForecaster", tmp_path / "repo", "--skip-tensorrt")) == 0
    monkeypatch.setattr(onnx_runner, "pb_utils", fake_pb_utils())
    cfg = parse_config((tmp_path / "repo" / "m" / "configs" / "cpu.pbtxt").read_text())
    from google.protobuf import json_format

    model_config = json_format.MessageToDict(cfg, preserving_proto_field_name=True)
    runner = onnx_runner.TritonPythonModel()
    runner.initialize({"model_config": json.dumps(model_config), "model_repository": str(tmp_path / "repo" / "m"),
                       "model_version": "1"})  # fmt: skip
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(n, 20, 1)).astype(np.float32) for n in (1, 3, 2)]
    calls = []
    real_run = runner.session.run
    monkeypatch.setattr(runner.session, "run", lambda *a: calls.append(1) or real_run(*a), raising=False)
    responses = runner.execute([{"series": FakeTensor("series", x)} for x in xs])
    assert len(calls) == 1  # one ORT call for the whole dynamic batch
    for x, resp in zip(xs, responses, strict=True):
        (out,) = resp.outputs
        assert out.name == "forecast" and out.array.shape == (len(x), 10) and out.array.dtype == np.float32
        np.testing.assert_allclose(out.array, real_run(["forecast"], {"series": x})[0], atol=1e-5)


def test_training_smoke(tmp_path: Path) -> None:
    from training.train import train

    for arch in ("transformer", "vae"):
        result = train(arch, steps=3, batch=16, lr=1e-3, n_train=256, out=tmp_path / f"{arch}.pth", threads=1)
        assert set(result["metrics"]) >= {"mae", "naive_mae", "sine_mae"}
        ckpt = torch.load(tmp_path / f"{arch}.pth", weights_only=True)
        assert {"state_dict", "model_config", "metrics"} <= set(ckpt)


@pytest.mark.parametrize(
    ("ckpt", "onnx"),
    [
        ("transformer.pth", "transformer_timeseries/1"),
        ("vae_step1000.pth", "vae_timeseries/1"),
        ("vae.pth", "vae_timeseries/2"),
    ],
)
def test_committed_onnx_matches_committed_checkpoint(ckpt: str, onnx: str) -> None:
    state = torch.load(ROOT / "training" / "checkpoints" / ckpt, weights_only=True)
    cls = TransformerForecaster if ckpt.startswith("transformer") else VAEForecaster
    model = cls(**state["model_config"])
    model.load_state_dict(state["state_dict"])
    model.eval()
    shape = (20, 1) if cls is TransformerForecaster else (1, 20)
    x = (np.random.default_rng(3).normal(size=(16, *shape)) * 2 + 1).astype(np.float32)
    session = ort.InferenceSession(str(ROOT / "model_repository" / onnx / "model.onnx"))
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(["forecast"], {"series": x})[0], ref, atol=1e-4, rtol=1e-4)
    assert state["metrics"]["improvement"] >= 0.30 and state["metrics"]["sine_mae"] < 0.15
