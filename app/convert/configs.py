"""Triton model configurations written by ``tgw convert``.

Two files per model (see docs/models.md):

- ``<model>/config.pbtxt``: production, TensorRT (``platform: "tensorrt_plan"``) on GPU, dynamic
  batching with preferred sizes, CUDA graphs for the optimisation profile's batch sizes.
- ``<model>/configs/cpu.pbtxt``: what the embedded Triton loads (it runs with
  ``--model-config-name=cpu``): Python backend + ONNX Runtime on ``<version>/model.onnx``
  through ``app.triton_models.onnx_runner``.
- ``<model>/configs/gpu.pbtxt`` (and ``gpu_eager``, ``gpu_nobatch`` for comparisons): Python backend +
  PyTorch FP16 with CUDA graphs on ``<version>/model.pt`` through ``app.triton_models.torch_runner``.

The text is produced from templates so it can carry comments, then parsed back into Triton's
``ModelConfig`` protobuf (``parse_config``) before anything is written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# dtype names accepted on the command line -> Triton data type
_DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "fp16": "TYPE_FP16",
    "half": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "fp32": "TYPE_FP32",
    "float": "TYPE_FP32",
    "float64": "TYPE_FP64",
    "fp64": "TYPE_FP64",
    "double": "TYPE_FP64",
}
for _v in set(_DTYPES.values()):
    _DTYPES[_v.lower()] = _v
    _DTYPES[_v.removeprefix("TYPE_").lower()] = _v

# CPU dynamic-batching delay, see the comment written into configs/cpu.pbtxt and docs/models.md.
DEFAULT_CPU_QUEUE_DELAY_US = 100
DEFAULT_GPU_QUEUE_DELAY_US = 100


def triton_dtype(name: str) -> str:
    """``float32`` / ``fp32`` / ``FP32`` / ``TYPE_FP32`` -> ``TYPE_FP32``; ValueError if unknown."""
    key = name.strip().lower()
    if key not in _DTYPES:
        known = "bool, uint8, int8, int16, int32, int64, float16, float32, float64"
        raise ValueError(f"unknown dtype {name!r} (known: {known})")
    return _DTYPES[key]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple[int, ...]  # per item, without the batch dimension
    dtype: str = "TYPE_FP32"

    def pbtxt(self) -> str:
        dims = ", ".join(str(d) for d in self.dims)
        return f'{{ name: "{self.name}" data_type: {self.dtype} dims: [ {dims} ] }}'


@dataclass
class ModelSpec:
    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    min_batch: int = 1
    opt_batch: int = 32
    max_batch: int = 128
    preferred_batch_sizes: list[int] = field(default_factory=list)  # empty: [opt, max]
    gpu_queue_delay_us: int = DEFAULT_GPU_QUEUE_DELAY_US
    cpu_queue_delay_us: int = DEFAULT_CPU_QUEUE_DELAY_US
    gpu_instance_count: int = 1
    cpu_instance_count: int = 2
    intra_op_threads: int = 1
    priority_levels: int = 0
    low_priority_queue: int = 64  # with priority levels: the lowest level's queue bound (REJECT beyond)
    versions: list[int] = field(default_factory=lambda: [1])
    precision: str = "fp16"  # fp32 | fp16 | int8, only recorded in the production config's comment

    def preferred(self) -> list[int]:
        sizes = self.preferred_batch_sizes or [self.opt_batch, self.max_batch]
        return sorted({s for s in sizes if 1 <= s <= self.max_batch})

    def graph_batch_sizes(self) -> list[int]:
        return sorted({self.min_batch, self.opt_batch, self.max_batch, *self.preferred()})

    def validate(self) -> None:
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"batch profile must satisfy 1 <= min <= opt <= max, got "
                f"{self.min_batch}/{self.opt_batch}/{self.max_batch}"
            )
        bad = [s for s in self.preferred_batch_sizes if not 1 <= s <= self.max_batch]
        if bad:
            raise ValueError(f"preferred batch sizes {bad} are outside 1..{self.max_batch}")
        for t in [*self.inputs, *self.outputs]:
            if not t.dims or any(d == 0 or d < -1 for d in t.dims):
                raise ValueError(f"tensor {t.name!r}: dims {list(t.dims)} must be positive (or -1)")
        names = [t.name for t in [*self.inputs, *self.outputs]]
        if len(set(names)) != len(names):
            raise ValueError(f"tensor names must be distinct, got {names}")
        if self.priority_levels < 0 or self.gpu_queue_delay_us < 0 or self.cpu_queue_delay_us < 0:
            raise ValueError("priority levels and queue delays must be >= 0")
        if self.gpu_instance_count < 1 or self.cpu_instance_count < 1 or self.intra_op_threads < 1:
            raise ValueError("instance counts and thread counts must be >= 1")


def _tensors(kind: str, specs: Sequence[TensorSpec]) -> str:
    body = ",\n".join(f"  {t.pbtxt()}" for t in specs)
    return f"{kind} [\n{body}\n]\n"


def _version_policy(spec: ModelSpec) -> str:
    if len(spec.versions) <= 1:
        return "version_policy: { latest: { num_versions: 1 } }\n"
    versions = ", ".join(str(v) for v in sorted(spec.versions))
    return (
        "# Several versions are served side by side; address one with /v1/models/{m}/versions/{v}/infer.\n"
        f"version_policy: {{ specific: {{ versions: [ {versions} ] }} }}\n"
    )


def _model(spec: ModelSpec, runtime: str) -> str:
    """What every configuration of the model says first: its name, ``runtime`` (platform or backend
    lines), its batch size and tensors."""
    return (
        f'name: "{spec.name}"\n{runtime}\nmax_batch_size: {spec.max_batch}\n'
        + _tensors("input", spec.inputs)
        + _tensors("output", spec.outputs)
    )


def _priority(spec: ModelSpec) -> str:
    if spec.priority_levels <= 0:
        return ""
    # 1 is the highest priority; requests without one get the lowest level, whose queue is bounded and
    # rejects beyond it (the gateway's lower tier is shed first; app.auth maps key tiers to levels).
    level = spec.priority_levels
    policy = (
        f"  priority_queue_policy {{\n    key: {level}\n"
        f"    value: {{ max_queue_size: {spec.low_priority_queue} timeout_action: REJECT }}\n  }}\n"
        if level > 1
        else ""
    )
    return f"  priority_levels: {level}\n  default_priority_level: {level}\n" + policy


def tensorrt_config(spec: ModelSpec) -> str:
    """Production configuration: TensorRT plan on GPU."""
    spec.validate()
    preferred = ", ".join(str(s) for s in spec.preferred())
    graphs = ",\n".join(f"      {{ batch_size: {b} }}" for b in spec.graph_batch_sizes())
    return (
        f"# Production configuration (GPU, TensorRT) written by `tgw convert`.\n"
        f"# <version>/model.plan is built from <version>/model.onnx on the target GPU\n"
        f"# ({spec.precision.upper()}, optimisation profile min/opt/max batch "
        f"{spec.min_batch}/{spec.opt_batch}/{spec.max_batch}):\n"
        f"# see build_plan.sh next to this file and Dockerfile.triton. The embedded CPU Triton loads\n"
        f"# configs/cpu.pbtxt instead (tritonserver --model-config-name=cpu).\n"
        + _model(spec, 'platform: "tensorrt_plan"')
        + f"# Wait up to {spec.gpu_queue_delay_us} us to fill a preferred batch: a batch-{spec.opt_batch}\n"
        f"# TensorRT launch costs about as much as batch 1, so a short wait buys throughput for\n"
        f"# little latency.\n"
        f"dynamic_batching {{\n"
        f"  preferred_batch_size: [ {preferred} ]\n"
        f"  max_queue_delay_microseconds: {spec.gpu_queue_delay_us}\n" + _priority(spec) + "}\n"
        f"instance_group [ {{ count: {spec.gpu_instance_count} kind: KIND_GPU }} ]\n"
        f"optimization {{\n"
        f"  cuda {{\n"
        f"    graphs: true\n"
        f"    graph_spec [\n{graphs}\n    ]\n"
        f"  }}\n"
        f"}}\n" + _version_policy(spec)
    )


def cpu_config(spec: ModelSpec) -> str:
    """CPU configuration for the embedded Triton: Python backend + ONNX Runtime."""
    spec.validate()
    return (
        "# CPU configuration written by `tgw convert`: loaded by the embedded Triton, which runs with\n"
        "# --model-config-name=cpu. Python backend running ONNX Runtime on <version>/model.onnx\n"
        "# (app/triton_models/onnx_runner.py); production uses ../config.pbtxt (TensorRT).\n"
        + _model(spec, 'backend: "python"')
        + f"# Wait up to {spec.cpu_queue_delay_us} us for more requests. Measured for the example models on\n"
        f"# 2 cores (wrk over HTTP): at 64 concurrent clients 100 us batches ~4-5 requests per ONNX\n"
        f"# Runtime call and matches 500 us in throughput, while a lone client pays ~0.2 ms extra\n"
        f"# instead of ~1 ms. See docs/models.md.\n"
        f"dynamic_batching {{\n"
        f"  max_queue_delay_microseconds: {spec.cpu_queue_delay_us}\n" + _priority(spec) + "}\n"
        f"# {spec.cpu_instance_count} instance(s) x {spec.intra_op_threads} ORT intra-op thread(s): with 2\n"
        f"# instances on the 2-core target one computes while the other moves tensors through the\n"
        f"# Python-backend stub.\n"
        f"instance_group [ {{ count: {spec.cpu_instance_count} kind: KIND_CPU }} ]\n"
        f"parameters [\n"
        f'  {{ key: "onnx_file" value: {{ string_value: "model.onnx" }} }},\n'
        f'  {{ key: "intra_op_threads" value: {{ string_value: "{spec.intra_op_threads}" }} }}\n'
        f"]\n" + _version_policy(spec)
    )


# GPU configurations (Python backend + PyTorch, app/triton_models/torch_runner.py), by name: the
# embedded Triton loads configs/<name>.pbtxt with --model-config-name=<name>. ``gpu`` is what
# TGW_TRITON_MODEL_CONFIG_NAME=auto picks on a GPU; the others exist for the comparisons in
# docs/performance.md ("On a GPU"): eager instead of CUDA graphs, dynamic batching off, both.
GPU_VARIANTS: dict[str, tuple[str, bool]] = {
    "gpu": ("graphs", True),
    "gpu_eager": ("eager", True),
    "gpu_nobatch": ("graphs", False),
    "gpu_eager_nobatch": ("eager", False),
}
TORCH_FILE = "model.pt"
TORCH_MODEL_PY = "model_torch.py"


def gpu_config(spec: ModelSpec, variant: str = "gpu") -> str:
    """GPU configuration: Python backend running the TorchScript file in FP16 on one GPU instance."""
    spec.validate()
    if variant not in GPU_VARIANTS:
        raise ValueError(f"unknown GPU config variant {variant!r} (known: {', '.join(GPU_VARIANTS)})")
    execution, batching = GPU_VARIANTS[variant]
    what = "one CUDA graph per batch bucket (1, 2, 4 ... max_batch_size), captured at load" if (
        execution == "graphs") else "eager PyTorch (no CUDA graphs), for comparison"  # fmt: skip
    text = (
        f"# GPU configuration `{variant}` written by `tgw convert`: loaded by the embedded Triton with\n"
        f"# --model-config-name={variant} (TGW_TRITON_MODEL_CONFIG_NAME=auto picks `gpu` where a GPU is\n"
        f"# visible). Python backend running <version>/{TORCH_FILE} (TorchScript) in FP16 with PyTorch,\n"
        f"# {what}\n"
        f"# (app/triton_models/torch_runner.py). No TensorRT plan was built: production's ../config.pbtxt\n"
        f"# (TensorRT) stays the reference and needs a TensorRT build on the target GPU.\n"
        + _model(spec, f'backend: "python"\ndefault_model_filename: "{TORCH_MODEL_PY}"')
    )
    if batching:
        text += (
            f"# Wait up to {spec.gpu_queue_delay_us} us for more requests: a batch costs about one launch.\n"
            f"dynamic_batching {{\n"
            f"  max_queue_delay_microseconds: {spec.gpu_queue_delay_us}\n" + _priority(spec) + "}\n"
        )
    else:
        text += "# Dynamic batching OFF (comparison only): every request is its own execution.\n"
    return text + (
        f"instance_group [ {{ count: {spec.gpu_instance_count} kind: KIND_GPU }} ]\n"
        f"parameters [\n"
        f'  {{ key: "torch_file" value: {{ string_value: "{TORCH_FILE}" }} }},\n'
        f'  {{ key: "precision" value: {{ string_value: "fp16" }} }},\n'
        f'  {{ key: "execution" value: {{ string_value: "{execution}" }} }}\n'
        f"]\n" + _version_policy(spec)
    )


def parse_config(text: str) -> Any:
    """Parse pbtxt into ``inference.ModelConfig`` (raises ``google.protobuf.text_format.ParseError``)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())
