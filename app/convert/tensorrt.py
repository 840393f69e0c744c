"""TensorRT engine build (where the ``tensorrt`` Python package exists) and the equivalent trtexec command.

TensorRT is not on PyPI in an installable form for these machines; it ships in NGC images
(``nvcr.io/nvidia/tritonserver:<yy.mm>-py3`` has the libraries, ``nvcr.io/nvidia/tensorrt`` has
``trtexec`` and the Python API). Where it is missing, ``tgw convert`` says so, prints the trtexec command
and writes ``build_plan.sh`` so the plan is built on the target GPU (Dockerfile.triton runs it).
"""

from __future__ import annotations

import importlib.util
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.convert.configs import ModelSpec

DEFAULT_WORKSPACE_MB = 1024
# TensorRT vs ONNX Runtime: max |err| <= atol + rtol * max |ORT| (FP32 allows TF32 kernels).
TRT_TOLERANCE = {"fp32": (1e-3, 1e-3), "fp16": (2e-2, 2e-2), "int8": (1e-1, 1e-1)}


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


def precision(fp16: bool, int8: bool) -> str:
    return "int8" if int8 else "fp16" if fp16 else "fp32"


def _shape(spec: ModelSpec, batch: int) -> str:
    return ",".join(f"{t.name}:{'x'.join(str(d) for d in (batch, *t.dims))}" for t in spec.inputs)


def trtexec_args(
    spec: ModelSpec, onnx: str, plan: str, fp16: bool, int8: bool, workspace_mb: int, calib_cache: str | None
) -> list[str]:
    args = [
        f"--onnx={onnx}",
        f"--saveEngine={plan}",
        f"--minShapes={_shape(spec, spec.min_batch)}",
        f"--optShapes={_shape(spec, spec.opt_batch)}",
        f"--maxShapes={_shape(spec, spec.max_batch)}",
        f"--memPoolSize=workspace:{workspace_mb}",
        "--skipInference",
    ]
    if fp16 or int8:
        args.append("--fp16")  # INT8 builds keep FP16 for layers without INT8 kernels
    if int8:
        args.append("--int8")
        if calib_cache:
            args.append(f"--calib={calib_cache}")
    return args


def trtexec_command(
    spec: ModelSpec, model_dir: Path, version: int, fp16: bool, int8: bool, workspace_mb: int
) -> str:
    vdir = model_dir / str(version)
    cache = str(vdir / "calibration.cache") if int8 else None
    args = trtexec_args(
        spec, str(vdir / "model.onnx"), str(vdir / "model.plan"), fp16, int8, workspace_mb, cache
    )
    return shlex.join(["trtexec", *args])


def build_script(spec: ModelSpec, fp16: bool, int8: bool, workspace_mb: int) -> str:
    """``build_plan.sh``: builds ``<v>/model.plan`` for every ``<v>/model.onnx`` of this model."""
    args = trtexec_args(spec, "$v/model.onnx", "$v/model.plan", fp16, False, workspace_mb, None)
    quoted = " ".join(a if "$v" in a else shlex.quote(a) for a in args)
    quoted = quoted.replace("$v/", '"$v"/')
    int8_part = ""
    if int8:
        int8_part = (
            '  if [ -f "$v/calibration.cache" ]; then set -- --int8 --calib="$v/calibration.cache"; else\n'
            '    echo "build_plan.sh: no $v/calibration.cache (made by tgw convert --int8 where TensorRT is'
            ' installed): building FP16 instead of INT8" >&2; set --; fi\n'
        )
    return (
        "#!/bin/sh\n"
        f"# Written by `tgw convert`: builds the TensorRT plan(s) of {spec.name} on the GPU this runs on\n"
        "# (plans are specific to the GPU and TensorRT version). Dockerfile.triton runs it; by hand:\n"
        "#   TRTEXEC=/usr/src/tensorrt/bin/trtexec sh build_plan.sh\n"
        "set -eu\n"
        'cd "$(dirname "$0")"\n'
        'TRTEXEC="${TRTEXEC:-trtexec}"\n'
        "for onnx in */model.onnx; do\n"
        '  v="${onnx%/model.onnx}"\n'
        '  if [ -f "$v/model.plan" ] && [ "$v/model.plan" -nt "$onnx" ]; then continue; fi\n'
        "  set --\n" + int8_part + f'  "$TRTEXEC" {quoted} "$@"\n'
        "done\n"
    )


@dataclass
class TrtResult:
    plan: Path
    max_abs_err: dict[int, float]
    tolerance: dict[int, float]


def _calibrator(trt: Any, data: np.ndarray, input_name: str, batch: int, cache: Path) -> Any:
    import torch

    class NpyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            super().__init__()
            self.index = 0
            self.buffer = torch.empty((batch, *data.shape[1:]), dtype=torch.float32, device="cuda")

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: Sequence[str]) -> list[int] | None:
            if self.index + batch > len(data):
                return None
            chunk = torch.from_numpy(
                np.ascontiguousarray(data[self.index : self.index + batch], dtype=np.float32)
            )
            self.buffer.copy_(chunk)
            self.index += batch
            return [int(self.buffer.data_ptr())]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.exists() else None

        def write_calibration_cache(self, blob: bytes) -> None:
            cache.write_bytes(bytes(blob))

    return NpyCalibrator()


def build_engine(
    spec: ModelSpec,
    onnx_path: Path,
    plan_path: Path,
    fp16: bool,
    int8: bool,
    workspace_mb: int,
    calib_data: np.ndarray | None = None,
) -> None:
    """Build ``plan_path`` with the TensorRT Python API (ONNX parser, one optimisation profile)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # TensorRT 8.x; implicit in 10
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    profile = builder.create_optimization_profile()
    for t in spec.inputs:
        profile.set_shape(
            t.name, (spec.min_batch, *t.dims), (spec.opt_batch, *t.dims), (spec.max_batch, *t.dims)
        )
    config.add_optimization_profile(profile)
    if fp16 or int8:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        if calib_data is None:
            raise ValueError("INT8 needs calibration data")
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_calibration_profile(profile)
        batch = min(spec.opt_batch, len(calib_data))
        config.int8_calibrator = _calibrator(
            trt, calib_data, spec.inputs[0].name, batch, plan_path.with_name("calibration.cache")
        )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    plan_path.write_bytes(bytes(serialized))


def run_engine(plan_path: Path, spec: ModelSpec, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run a plan once (CUDA buffers through torch) and return the outputs as numpy."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    keep = []
    for t, a in zip(spec.inputs, arrays, strict=True):
        buf = torch.from_numpy(np.ascontiguousarray(a)).cuda()
        keep.append(buf)
        context.set_input_shape(t.name, tuple(a.shape))
        context.set_tensor_address(t.name, int(buf.data_ptr()))
    outs = []
    for t in spec.outputs:
        shape = tuple(context.get_tensor_shape(t.name))
        buf = torch.empty(
            shape, dtype=torch.float32 if t.dtype == "TYPE_FP32" else torch.float16, device="cuda"
        )
        outs.append(buf)
        context.set_tensor_address(t.name, int(buf.data_ptr()))
    if not context.execute_async_v3(stream.cuda_stream):
        raise RuntimeError("TensorRT execution failed")
    stream.synchronize()
    return [o.float().cpu().numpy() for o in outs]
