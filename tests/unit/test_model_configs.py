"""The committed model repository: every config parses as Triton's ModelConfig, the contracts hold, the
shipped ONNX models forecast (no torch needed: ONNX Runtime on the committed files)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from app.convert.configs import ModelSpec, TensorSpec, cpu_config, parse_config, tensorrt_config, triton_dtype
from app.triton_models.forecast import postprocess, preprocess

REPO = Path(__file__).resolve().parents[2] / "model_repository"
CONFIGS = sorted([*REPO.glob("*/config.pbtxt"), *REPO.glob("*/configs/*.pbtxt")])
ONNX_MODELS = {"transformer_timeseries": (20, 1), "vae_timeseries": (1, 20)}


def load(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def sine_window(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(30)
    s = np.sin(2 * np.pi * t / 10).astype(np.float32)
    return s[:20].reshape(1, *shape), s[20:]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_config_parses_and_names_its_directory(path: Path) -> None:
    cfg = load(path)
    model_dir = path.parent if path.name == "config.pbtxt" else path.parent.parent
    assert cfg.name == model_dir.name


def test_expected_models_are_present() -> None:
    names = {p.parent.name for p in REPO.glob("*/config.pbtxt")}
    assert {"transformer_timeseries", "vae_timeseries", "forecast", "forecast_preprocess",
            "forecast_postprocess", "forecast_stream"} <= names  # fmt: skip


@pytest.mark.parametrize("name", sorted(ONNX_MODELS))
def test_onnx_model_contracts(name: str) -> None:
    dims = list(ONNX_MODELS[name])
    cpu, trt = load(REPO / name / "configs" / "cpu.pbtxt"), load(REPO / name / "config.pbtxt")
    for cfg in (cpu, trt):
        assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
            ("series", model_config_pb2.TYPE_FP32, dims)
        ]
        assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [
            ("forecast", model_config_pb2.TYPE_FP32, [10])
        ]
        assert cfg.max_batch_size == 128
        assert cfg.HasField("dynamic_batching")
    assert cpu.backend == "python" and not cpu.platform
    assert cpu.dynamic_batching.max_queue_delay_microseconds > 0
    assert all(g.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU for g in cpu.instance_group)
    assert cpu.parameters["intra_op_threads"].string_value == "1"
    assert trt.platform == "tensorrt_plan"
    assert all(g.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU for g in trt.instance_group)
    assert list(trt.dynamic_batching.preferred_batch_size)
    assert trt.optimization.cuda.graphs
    assert {g.batch_size for g in trt.optimization.cuda.graph_spec} >= {1, 128}
    for version in (p for p in (REPO / name).iterdir() if p.name.isdigit()):
        onnx = version / "model.onnx"
        assert onnx.stat().st_size < 5 * 1024 * 1024
        assert "app.triton_models.onnx_runner" in (version / "model.py").read_text()
        assert not (version / "model.plan").exists()


def test_vae_serves_two_versions() -> None:
    cfg = load(REPO / "vae_timeseries" / "configs" / "cpu.pbtxt")
    assert list(cfg.version_policy.specific.versions) == [1, 2]
    assert load(REPO / "vae_timeseries" / "config.pbtxt").version_policy == cfg.version_policy
    assert {p.name for p in (REPO / "vae_timeseries").iterdir() if p.name.isdigit()} == {"1", "2"}


def test_forecast_ensemble_wiring() -> None:
    cfg = load(REPO / "forecast" / "config.pbtxt")
    assert cfg.platform == "ensemble" and cfg.max_batch_size == 0
    inputs = {i.name: i for i in cfg.input}
    assert list(inputs["series"].dims) == [-1] and inputs["series"].data_type == model_config_pb2.TYPE_FP32
    assert inputs["horizon"].optional and inputs["horizon"].data_type == model_config_pb2.TYPE_INT32
    steps = [s.model_name for s in cfg.ensemble_scheduling.step]
    assert steps == ["forecast_preprocess", "transformer_timeseries", "forecast_postprocess"]
    # every step input is produced by an earlier step or is an ensemble input
    available = set(inputs)
    for step in cfg.ensemble_scheduling.step:
        assert set(step.input_map.values()) <= available, step.model_name
        available |= set(step.output_map.values())
    assert "forecast" in available
    assert (REPO / "forecast" / "1").is_dir()  # Triton needs a version directory, even for an ensemble


def test_forecast_stream_config() -> None:
    """Decoupled, one series per request, ONE CPU instance (a request holds it until its last step or its
    cancellation); the GPU configuration is the same model (numpy + BLS: the GPU work is the transformer's)."""
    cfg = load(REPO / "forecast_stream" / "config.pbtxt")
    assert cfg.backend == "python" and cfg.max_batch_size == 0 and cfg.model_transaction_policy.decoupled
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in cfg.input] == [
        ("series", model_config_pb2.TYPE_FP32, [-1], False),
        ("horizon", model_config_pb2.TYPE_INT32, [1], False),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [
        ("step", model_config_pb2.TYPE_INT32, [1]),
        ("value", model_config_pb2.TYPE_FP32, [1]),
    ]
    assert [(g.count, g.kind) for g in cfg.instance_group] == [
        (1, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]
    assert {k: v.string_value for k, v in cfg.parameters.items()} == {
        "model": "transformer_timeseries", "window": "20", "max_horizon": "10000",
    }  # fmt: skip
    assert load(REPO / "forecast_stream" / "configs" / "gpu.pbtxt") == cfg
    assert not (REPO / "forecast_stream" / "configs" / "cpu.pbtxt").exists()  # the CPU Triton falls back
    assert "app.triton_models.forecast_stream" in (REPO / "forecast_stream" / "1" / "model.py").read_text()


@pytest.mark.parametrize("name", sorted(ONNX_MODELS))
def test_shipped_onnx_forecasts_the_sine(name: str) -> None:
    ort = pytest.importorskip("onnxruntime")
    versions = sorted(int(p.name) for p in (REPO / name).iterdir() if p.name.isdigit())
    for v in versions:
        session = ort.InferenceSession(
            str(REPO / name / str(v) / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        x, target = sine_window(ONNX_MODELS[name])
        pred = session.run(["forecast"], {"series": x})[0][0]
        assert np.abs(pred - target).mean() < 0.15, (name, v)
        # raw values: a shifted and scaled sine gives the shifted and scaled forecast
        pred2 = session.run(["forecast"], {"series": x * 50 + 1000})[0][0]
        np.testing.assert_allclose(pred2, pred * 50 + 1000, rtol=0, atol=1e-2)


def test_preprocess_and_postprocess() -> None:
    series = np.arange(30, dtype=np.float32) * 2 + 5
    window, scale, horizon = preprocess(series, None)
    assert window.shape == (1, 20, 1) and window.dtype == np.float32
    np.testing.assert_allclose(window[0, :, 0] * scale[1] + scale[0], series[-20:], rtol=1e-5)
    assert horizon.tolist() == [10]
    out = postprocess(window[:, :10, 0], scale, np.array([4], np.int32))
    np.testing.assert_allclose(out, series[10:14], rtol=1e-5)
    assert preprocess(series, np.array([3], np.int32))[2].tolist() == [3]
    flat = preprocess(np.ones(25, np.float32), None)
    assert np.all(np.isfinite(flat[0])) and flat[1][1] > 0
    for bad, h, msg in [
        (np.ones(19), None, "at least 20"),
        (np.r_[np.ones(20), np.nan], None, "NaN"),
        (np.ones(20), np.array([0]), "between 1 and 10"),
        (np.ones(20), np.array([11]), "between 1 and 10"),
    ]:
        with pytest.raises(ValueError, match=msg):
            preprocess(bad, h)


def spec(**kw: object) -> ModelSpec:
    base: dict[str, object] = {
        "name": "m",
        "inputs": [TensorSpec("x", (20, 1)), TensorSpec("mask", (20,), "TYPE_BOOL")],
        "outputs": [TensorSpec("y", (10,))],
    }
    base.update(kw)
    return ModelSpec(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kw",
    [{}, {"priority_levels": 3}, {"versions": [1, 2, 5]}, {"preferred_batch_sizes": [8, 16, 64]},
     {"min_batch": 4, "opt_batch": 8, "max_batch": 256, "gpu_instance_count": 2, "cpu_instance_count": 1}],
)  # fmt: skip
def test_generated_configs_round_trip(kw: dict[str, object]) -> None:
    s = spec(**kw)
    for text in (tensorrt_config(s), cpu_config(s)):
        cfg = parse_config(text)
        again = parse_config(text_format.MessageToString(cfg))
        assert again == cfg
        assert cfg.max_batch_size == s.max_batch
        assert [i.name for i in cfg.input] == ["x", "mask"]
        assert cfg.input[1].data_type == model_config_pb2.TYPE_BOOL
        assert cfg.dynamic_batching.priority_levels == s.priority_levels
        if len(s.versions) > 1:
            assert list(cfg.version_policy.specific.versions) == sorted(s.versions)
        else:
            assert cfg.version_policy.latest.num_versions == 1
    trt = parse_config(tensorrt_config(s))
    assert list(trt.dynamic_batching.preferred_batch_size) == s.preferred()
    assert [g.batch_size for g in trt.optimization.cuda.graph_spec] == s.graph_batch_sizes()
    assert trt.instance_group[0].count == s.gpu_instance_count
    assert parse_config(cpu_config(s)).instance_group[0].count == s.cpu_instance_count


def test_spec_validation_and_dtypes() -> None:
    assert triton_dtype("float32") == triton_dtype("FP32") == triton_dtype("TYPE_FP32") == "TYPE_FP32"
    assert triton_dtype("half") == "TYPE_FP16"
    with pytest.raises(ValueError, match="unknown dtype"):
        triton_dtype("complex64")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        spec(min_batch=8, opt_batch=4).validate()
    with pytest.raises(ValueError, match="preferred"):
        spec(preferred_batch_sizes=[512]).validate()
    with pytest.raises(ValueError, match="distinct"):
        spec(outputs=[TensorSpec("x", (10,))]).validate()


@pytest.mark.parametrize("name", sorted(ONNX_MODELS))
def test_models_take_the_tiers_priorities(name: str) -> None:
    """app.auth sends priority 1 (high tier) or 2 (standard); the lower level's queue is bounded and
    rejects beyond it, so the standard tier is shed first (docs/auth.md)."""
    for cfg in (load(REPO / name / "configs" / "cpu.pbtxt"), load(REPO / name / "config.pbtxt")):
        batching = cfg.dynamic_batching
        assert batching.priority_levels == 2 and batching.default_priority_level == 2
        low = batching.priority_queue_policy[2]
        assert low.max_queue_size > 0 and low.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT
        assert 1 not in batching.priority_queue_policy
