"""The conversion steps: load a checkpoint into its class, export ONNX, check parity, write the model dir.

torch / onnx / onnxruntime are imported inside the functions: ``app.convert`` stays importable without
the ``models`` extra (``tgw --help`` must not need torch).
"""

from __future__ import annotations

import importlib.util
import inspect
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from app.convert.configs import (
    GPU_VARIANTS,
    TORCH_FILE,
    TORCH_MODEL_PY,
    ModelSpec,
    TensorSpec,
    cpu_config,
    gpu_config,
    parse_config,
    tensorrt_config,
)
from app.triton_models.onnx_runner import TRITON_TO_NUMPY

OPSET = 18  # >= 17 as required; 18 is what torch's dynamo exporter emits natively
# Parity: fail when max |ORT - PyTorch| > PARITY_ATOL + PARITY_RTOL * max |PyTorch|.
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-4
MODEL_PY = (
    '"""Serves model.onnx with ONNX Runtime (CPU config); see app/triton_models/onnx_runner.py."""\n\n'
    "from app.triton_models.onnx_runner import TritonPythonModel  # noqa: F401\n"
)
TORCH_MODEL_PY_TEXT = (
    '"""Serves model.pt with PyTorch on a GPU (configs/gpu*.pbtxt); '
    'see app/triton_models/torch_runner.py."""\n\n'
    "from app.triton_models.torch_runner import TritonPythonModel  # noqa: F401\n"
)

NUMPY_DTYPES: dict[str, Any] = TRITON_TO_NUMPY

Reporter = Callable[[str], None]


class ConvertError(Exception):
    """A user error: printed as one clear message, exit code 2."""


@dataclass
class ParityResult:
    batch: int
    max_abs_err: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_err <= self.tolerance


def load_class(module_file: Path, class_name: str) -> type:
    if not module_file.is_file():
        raise ConvertError(f"module file not found: {module_file}")
    mod_name = f"_tgw_convert_{module_file.stem}_{abs(hash(str(module_file.resolve())))}"
    spec = importlib.util.spec_from_file_location(mod_name, module_file)
    if spec is None or spec.loader is None:
        raise ConvertError(f"cannot import {module_file} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module  # dataclasses and pickling look the module up
    parent = str(module_file.resolve().parent)
    added = parent not in sys.path
    if added:
        sys.path.insert(0, parent)  # sibling imports of the module file
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ConvertError(f"importing {module_file} failed: {type(exc).__name__}: {exc}") from exc
    finally:
        if added:
            sys.path.remove(parent)
    cls = getattr(module, class_name, None)
    if cls is None or not inspect.isclass(cls):
        classes = sorted(
            n for n, v in vars(module).items() if inspect.isclass(v) and v.__module__ == mod_name
        )
        raise ConvertError(
            f"class {class_name!r} not found in {module_file} (classes there: {classes or 'none'})"
        )
    return cls


def load_checkpoint(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state_dict, model_config)`` from ``{"state_dict", "model_config"}`` or a bare state_dict."""
    import torch

    if not path.is_file():
        raise ConvertError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConvertError(f"cannot load checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(ckpt, dict):
        raise ConvertError(
            f"{path}: expected a dict (state_dict or {{'state_dict', 'model_config'}}), got {type(ckpt)}"
        )
    if "state_dict" in ckpt:
        state, config = ckpt["state_dict"], ckpt.get("model_config") or {}
    else:
        state, config = ckpt, {}
    if not isinstance(config, dict):
        raise ConvertError(f"{path}: model_config must be a dict, got {type(config).__name__}")
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvertError(f"{path}: state_dict values must all be tensors")
    return dict(state), dict(config)


def build_model(cls: type, model_config: dict[str, Any], state: dict[str, Any]) -> Any:
    import torch

    try:
        model = cls(**model_config)
    except TypeError as exc:
        raise ConvertError(
            f"{cls.__name__}(**model_config) failed: {exc} (model_config: {model_config})"
        ) from exc
    if not isinstance(model, torch.nn.Module):
        raise ConvertError(f"{cls.__name__} is not a torch.nn.Module")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if tuple(state[k].shape) != tuple(expected[k].shape)
    )
    if missing or unexpected or shapes:
        lines = [f"state_dict does not match {cls.__name__}(**{model_config}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if shapes:
            lines.append(f"  shape mismatches ({len(shapes)}): " + "; ".join(shapes))
        raise ConvertError("\n".join(lines))
    model.load_state_dict(state, strict=True)
    return model.eval()


def random_inputs(inputs: Sequence[TensorSpec], batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = []
    for t in inputs:
        shape = (batch, *(d if d > 0 else 8 for d in t.dims))
        dtype = NUMPY_DTYPES[t.dtype]
        a: np.ndarray
        if np.issubdtype(dtype, np.floating):
            # raw-value-like inputs: an offset and a scale, not only N(0, 1)
            a = rng.normal(size=shape) * rng.uniform(0.5, 3.0) + rng.uniform(-2, 2)
        elif dtype == np.bool_:
            a = rng.random(shape) > 0.5
        else:
            a = rng.integers(0, 10, size=shape)
        arrays.append(np.ascontiguousarray(a, dtype=dtype))
    return arrays


def torch_forward(model: Any, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        out = model(*[torch.from_numpy(a) for a in arrays])
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [o.detach().cpu().numpy() for o in outs]


def check_forward(model: Any, spec: ModelSpec) -> None:
    """Run the model on batch 2 and compare its outputs with the declared output shapes."""
    arrays = random_inputs(spec.inputs, 2, seed=0)
    try:
        outs = torch_forward(model, arrays)
    except Exception as exc:
        shapes = ", ".join(f"{t.name} {[2, *t.dims]}" for t in spec.inputs)
        raise ConvertError(
            f"the model's forward fails on the declared input shapes ({shapes}): {type(exc).__name__}: {exc}"
        ) from exc
    if len(outs) != len(spec.outputs):
        raise ConvertError(f"the model returns {len(outs)} output(s), {len(spec.outputs)} declared")
    for o, t in zip(outs, spec.outputs, strict=True):
        want = [2, *t.dims]
        if len(o.shape) != len(want) or any(w not in (-1, g) for w, g in zip(want, o.shape, strict=True)):
            raise ConvertError(
                f"output {t.name!r}: the model returns shape {list(o.shape)} for batch 2, declared {want} "
                f"(--output-shapes {','.join(str(d) for d in t.dims)})"
            )


def export_onnx(model: Any, spec: ModelSpec, path: Path, opset: int = OPSET) -> None:
    """Export with a dynamic batch axis (torch.export-based exporter, single self-contained file)."""
    import torch

    example = tuple(torch.from_numpy(a) for a in random_inputs(spec.inputs, 2, seed=1))
    batch = torch.export.Dim("batch", min=1, max=max(spec.max_batch, 2) * 8)
    dynamic_shapes = tuple({0: batch} for _ in spec.inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.onnx.export(
            model,
            example,
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    except Exception as exc:
        raise ConvertError(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    import onnx

    onnx.checker.check_model(str(path))


def export_torchscript(model: Any, spec: ModelSpec, path: Path) -> None:
    """Trace the model into TorchScript (what the GPU runner loads) and check it on another batch size."""
    import torch

    example = tuple(torch.from_numpy(a) for a in random_inputs(spec.inputs, 2, seed=1))
    try:
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
    except Exception as exc:
        raise ConvertError(f"TorchScript trace failed: {type(exc).__name__}: {exc}") from exc
    arrays = random_inputs(spec.inputs, 3, seed=2)
    ref = torch_forward(model, arrays)
    got = torch_forward(traced, arrays)
    for g, r in zip(got, ref, strict=True):
        tolerance = PARITY_ATOL + PARITY_RTOL * float(np.max(np.abs(r)))
        if g.shape != r.shape or float(np.max(np.abs(g - r))) > tolerance:
            raise ConvertError(
                "the traced TorchScript model disagrees with PyTorch on batch 3 "
                "(data-dependent control flow?); nothing written"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path))


def ort_session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def check_parity(model: Any, spec: ModelSpec, onnx_path: Path, batches: Sequence[int]) -> list[ParityResult]:
    session = ort_session(onnx_path)
    results = []
    for i, b in enumerate(batches):
        arrays = random_inputs(spec.inputs, b, seed=100 + i)
        ref = torch_forward(model, arrays)
        got = session.run(
            [t.name for t in spec.outputs], {t.name: a for t, a in zip(spec.inputs, arrays, strict=True)}
        )
        err = max(float(np.max(np.abs(g.astype(np.float64) - r))) for g, r in zip(got, ref, strict=True))
        scale = max(float(np.max(np.abs(r))) for r in ref)
        results.append(ParityResult(b, err, PARITY_ATOL + PARITY_RTOL * scale))
    return results


def write_model_dir(
    spec: ModelSpec,
    onnx_file: Path,
    output_dir: Path,
    version: int,
    force: bool,
    trtexec: str | None = None,
    torch_file: Path | None = None,
) -> Path:
    """Write ``<output>/<name>/{config.pbtxt, configs/cpu.pbtxt, <version>/{model.onnx, model.py}}``, and
    with ``torch_file`` also ``configs/gpu*.pbtxt`` and ``<version>/{model.pt, model_torch.py}``."""
    model_dir = output_dir / spec.name
    version_dir = model_dir / str(version)
    trt_text, cpu_text = tensorrt_config(spec), cpu_config(spec)
    gpu_texts = {v: gpu_config(spec, v) for v in GPU_VARIANTS} if torch_file else {}
    for text in (trt_text, cpu_text, *gpu_texts.values()):
        parse_config(text)  # never write a config Triton would reject
    if version_dir.exists():
        if not force:
            raise ConvertError(f"{version_dir} already exists (use --force to overwrite it)")
        shutil.rmtree(version_dir)
    version_dir.mkdir(parents=True)
    shutil.copyfile(onnx_file, version_dir / "model.onnx")
    (version_dir / "model.py").write_text(MODEL_PY)
    (model_dir / "configs").mkdir(exist_ok=True)
    (model_dir / "config.pbtxt").write_text(trt_text)
    (model_dir / "configs" / "cpu.pbtxt").write_text(cpu_text)
    if torch_file is not None:
        shutil.copyfile(torch_file, version_dir / TORCH_FILE)
        (version_dir / TORCH_MODEL_PY).write_text(TORCH_MODEL_PY_TEXT)
        for variant, text in gpu_texts.items():
            (model_dir / "configs" / f"{variant}.pbtxt").write_text(text)
    if trtexec:
        script = model_dir / "build_plan.sh"
        script.write_text(trtexec)
        script.chmod(0o755)
    return model_dir


def timed(report: Reporter, label: str) -> Callable[[], None]:
    t0 = time.perf_counter()

    def done() -> None:
        report(f"{label} done in {time.perf_counter() - t0:.1f}s")

    return done
