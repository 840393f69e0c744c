"""GPU serving, the parts that run without a GPU: the GPU model configs, the torch runner's batch buckets
and options, ``TGW_TRITON_MODEL_CONFIG_NAME=auto``, and Triton's statistics in the bench. The runner itself
is exercised on CPU by tests/integration/test_convert_served.py and on the H200 by scripts/gpu/run.sh."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from app.bench.stats import LevelResult, triton_counts
from app.convert.configs import GPU_VARIANTS, ModelSpec, TensorSpec, gpu_config, parse_config
from app.launcher import gpu_visible, resolve_model_config_name
from app.settings import Settings
from app.triton_models.torch_runner import batch_buckets, bucket_for, chunks, parse_options

REPO = Path(__file__).resolve().parents[2] / "model_repository"
GPU_MODELS = ("transformer_timeseries", "vae_timeseries")


def load(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("name", GPU_MODELS)
@pytest.mark.parametrize("variant", sorted(GPU_VARIANTS))
def test_shipped_gpu_configs(name: str, variant: str) -> None:
    cfg = load(REPO / name / "configs" / f"{variant}.pbtxt")
    cpu = load(REPO / name / "configs" / "cpu.pbtxt")
    assert cfg.name == name and cfg.backend == "python" and not cfg.platform
    assert cfg.default_model_filename == "model_torch.py"
    assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
        (i.name, i.data_type, list(i.dims)) for i in cpu.input
    ]
    assert [(o.name, list(o.dims)) for o in cfg.output] == [(o.name, list(o.dims)) for o in cpu.output]
    assert cfg.max_batch_size == cpu.max_batch_size == 128
    assert cfg.version_policy == cpu.version_policy
    assert [g.kind for g in cfg.instance_group] == [model_config_pb2.ModelInstanceGroup.KIND_GPU]
    execution, batching = GPU_VARIANTS[variant]
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params == {"torch_file": "model.pt", "precision": "fp16", "execution": execution}
    assert cfg.HasField("dynamic_batching") == batching
    assert (
        parse_options({"parameters": {k: {"string_value": v} for k, v in params.items()}})["execution"]
        == execution
    )
    for version in (p for p in (REPO / name).iterdir() if p.name.isdigit()):
        assert (version / "model.pt").stat().st_size < 5 * 1024 * 1024
        assert "app.triton_models.torch_runner" in (version / "model_torch.py").read_text()


def test_auto_on_cpu_keeps_cpu_configs_and_tensorrt_is_the_reference() -> None:
    for name in GPU_MODELS:
        assert "No TensorRT plan was built" in (REPO / name / "configs" / "gpu.pbtxt").read_text()
        assert load(REPO / name / "config.pbtxt").platform == "tensorrt_plan"


@pytest.mark.parametrize("variant", sorted(GPU_VARIANTS))
def test_generated_gpu_config_round_trips(variant: str) -> None:
    spec = ModelSpec("m", [TensorSpec("x", (3, 224, 224))], [TensorSpec("y", (10,))], max_batch=64,
                     priority_levels=2, versions=[1, 3])  # fmt: skip
    cfg = parse_config(gpu_config(spec, variant))
    assert parse_config(text_format.MessageToString(cfg)) == cfg
    assert cfg.max_batch_size == 64 and list(cfg.input[0].dims) == [3, 224, 224]
    assert list(cfg.version_policy.specific.versions) == [1, 3]
    if GPU_VARIANTS[variant][1]:
        assert cfg.dynamic_batching.priority_levels == 2
    with pytest.raises(ValueError, match="unknown GPU config variant"):
        gpu_config(spec, "gpu_fast")


def test_batch_buckets_and_padding() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(128) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert batch_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 100]
    b = batch_buckets(128)
    assert [bucket_for(n, b) for n in (1, 2, 3, 5, 33, 64, 65, 128)] == [1, 2, 4, 8, 64, 64, 128, 128]
    with pytest.raises(ValueError, match="exceed"):
        bucket_for(129, b)
    with pytest.raises(ValueError, match=">= 1"):
        batch_buckets(0)


def test_request_chunks_fit_max_batch() -> None:
    assert chunks([1, 1, 1], 4) == [[0, 1, 2]]
    assert chunks([3, 2, 2, 4], 4) == [[0], [1, 2], [3]]
    assert chunks([5, 1], 4) == [[0], [1]]  # an oversized request alone (answered with an error)
    assert chunks([], 4) == []


def test_runner_options_are_checked() -> None:
    assert parse_options({}) == {"torch_file": "model.pt", "precision": "fp16", "execution": "graphs"}
    with pytest.raises(ValueError, match="execution"):
        parse_options({"parameters": {"execution": {"string_value": "fast"}}})
    with pytest.raises(ValueError, match="precision"):
        parse_options({"parameters": {"precision": {"string_value": "int4"}}})


def test_auto_config_name() -> None:
    yes, no = (lambda: True), (lambda: False)
    assert resolve_model_config_name("auto", has_gpu=yes, has_torch=yes) == "gpu"
    assert resolve_model_config_name("auto", has_gpu=no, has_torch=yes) == "cpu"
    assert resolve_model_config_name("auto", has_gpu=yes, has_torch=no) == "cpu"  # GPU configs need torch
    assert resolve_model_config_name("gpu_eager", has_gpu=no, has_torch=no) == "gpu_eager"
    assert resolve_model_config_name(None) is None
    assert Settings().embedded.triton_model_config_name == "auto"
    with pytest.raises(ValueError):
        Settings(triton_model_config_name="../x")


def test_gpu_hidden_by_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert gpu_visible() is False
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert gpu_visible() is False


def test_triton_statistics_give_the_batch_formed() -> None:
    stats = {"model_stats": [{"name": "m", "version": "1", "inference_count": 300, "execution_count": 10},
                             {"name": "m", "version": "2", "inference_count": 20, "execution_count": 10}]}  # fmt: skip
    assert triton_counts(stats) == (320, 20, 0)
    stats["model_stats"][0]["inference_stats"] = {"success": {"count": 12, "ns": 5}}
    assert triton_counts(stats) == (320, 20, 12)
    assert triton_counts({}) == (0, 0, 0)
    r = LevelResult("m", "triton-http", 64, 1.0, 320, 0, 320.0, 1, 1, 1, 1, 1, 1, 0.1, 10.0,
                    triton_inferences=320, triton_executions=20)  # fmt: skip
    assert r.batch_formed == 16.0 and r.row()["batch_formed"] == 16.0
