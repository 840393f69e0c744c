"""``tgw convert``: a trained PyTorch checkpoint -> a Triton model directory, in one command.

    tgw convert --checkpoint training/checkpoints/transformer.pth \\
        --module training/models.py --model-class TransformerForecaster \\
        --name my_forecaster --input-shapes 20,1 --output-shapes 10

Steps (each reported): load + eval the model, export ONNX (dynamic batch axis, opset 18), check ONNX
Runtime against PyTorch on batches of size 1 and max, write the model directory (production TensorRT
``config.pbtxt`` + ``configs/cpu.pbtxt`` for the embedded CPU Triton + ``<version>/model.onnx``),
build and check ``model.plan`` where TensorRT is installed. Exit codes: 0 ok, 1 a check failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from app.convert.configs import (
    DEFAULT_CPU_QUEUE_DELAY_US,
    DEFAULT_GPU_QUEUE_DELAY_US,
    ModelSpec,
    TensorSpec,
    triton_dtype,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _dims(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bad shape {text!r}: expected comma-separated ints, e.g. 20,1"
        ) from None
    if not dims or any(d == 0 or d < -1 for d in dims):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}: dims must be positive")
    return dims


def _ints(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert",
        help="PyTorch checkpoint -> ONNX -> Triton model directory (+ TensorRT plan where available)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("model")
    src.add_argument(
        "--checkpoint", type=Path, required=True, help=".pth: state_dict or {state_dict, model_config}"
    )
    src.add_argument("--module", type=Path, required=True, help="Python file that defines the model class")
    src.add_argument(
        "--model-class", required=True, help="class name in --module; built as Class(**model_config)"
    )
    src.add_argument("--name", required=True, help="Triton model name (directory name)")
    src.add_argument(
        "--input-shapes",
        type=_dims,
        nargs="+",
        required=True,
        metavar="D1,D2",
        help="per-item input shape(s) without batch, one per input, e.g. 20,1",
    )
    src.add_argument("--output-shapes", type=_dims, nargs="+", required=True, metavar="D1,D2")
    src.add_argument("--input-names", nargs="+", help="default: series (one input) or input_<i>")
    src.add_argument("--output-names", nargs="+", help="default: forecast (one output) or output_<i>")
    src.add_argument("--input-dtypes", nargs="+", default=["float32"], help="one for all or one per input")
    src.add_argument("--output-dtypes", nargs="+", default=["float32"])
    b = p.add_argument_group("batching and serving")
    b.add_argument("--min-batch", type=int, default=1)
    b.add_argument("--opt-batch", type=int, default=32)
    b.add_argument(
        "--max-batch", type=int, default=128, help="max_batch_size and the profile's max (default 128)"
    )
    b.add_argument("--preferred-batch-sizes", type=_ints, default=None, help="e.g. 32,128 (default: opt,max)")
    b.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=DEFAULT_GPU_QUEUE_DELAY_US,
        help=f"GPU dynamic-batching delay (default {DEFAULT_GPU_QUEUE_DELAY_US})",
    )
    b.add_argument(
        "--cpu-max-queue-delay-us",
        type=int,
        default=DEFAULT_CPU_QUEUE_DELAY_US,
        help=f"CPU config's delay (default {DEFAULT_CPU_QUEUE_DELAY_US})",
    )
    b.add_argument("--instance-count", type=int, default=1, help="GPU instances in config.pbtxt (default 1)")
    b.add_argument(
        "--cpu-instance-count", type=int, default=2, help="CPU instances in configs/cpu.pbtxt (default 2)"
    )
    b.add_argument(
        "--priority-levels", type=int, default=0, help="dynamic-batching priority levels (0 = off)"
    )
    prec = p.add_argument_group("TensorRT precision")
    fp16 = prec.add_mutually_exclusive_group()
    fp16.add_argument("--fp16", dest="fp16", action="store_true", default=True, help="FP16 plan (default)")
    fp16.add_argument("--no-fp16", dest="fp16", action="store_false", help="FP32 plan")
    prec.add_argument("--int8", action="store_true", help="INT8 plan, calibrated with --calib-data")
    prec.add_argument("--calib-data", type=Path, help=".npy of shape [N, *input_shape] (with --int8)")
    prec.add_argument("--workspace-mb", type=int, default=1024, help="TensorRT workspace limit (MiB)")
    prec.add_argument(
        "--skip-tensorrt", action="store_true", help="do not build model.plan even if TensorRT exists"
    )
    out = p.add_argument_group("output")
    out.add_argument("--output-dir", type=Path, default=Path("model_repository"))
    out.add_argument("--version", type=int, default=1)
    out.add_argument(
        "--version-policy",
        choices=["latest", "all"],
        default="latest",
        help="latest: serve the newest version; all: serve every version directory present",
    )
    out.add_argument("--force", action="store_true", help="write into an existing model directory")
    out.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="max |ONNX Runtime - PyTorch| allowed (default 1e-4 + 1e-4 * max|output|)",
    )
    p.set_defaults(fn=run)


def _names(given: list[str] | None, n: int, single: str, prefix: str) -> list[str]:
    if given is None:
        return [single] if n == 1 else [f"{prefix}_{i}" for i in range(n)]
    if len(given) != n:
        raise ValueError(f"{len(given)} {prefix} name(s) for {n} shape(s)")
    return given


def _dtypes(given: list[str], n: int, kind: str) -> list[str]:
    if len(given) not in (1, n):
        raise ValueError(f"{len(given)} {kind} dtype(s) for {n} tensor(s): give one, or one per tensor")
    return [triton_dtype(d) for d in (given * n if len(given) == 1 else given)]


def build_spec(args: argparse.Namespace) -> ModelSpec:
    in_names = _names(args.input_names, len(args.input_shapes), "series", "input")
    out_names = _names(args.output_names, len(args.output_shapes), "forecast", "output")
    in_types = _dtypes(args.input_dtypes, len(in_names), "input")
    out_types = _dtypes(args.output_dtypes, len(out_names), "output")
    if not args.name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"model name {args.name!r}: use letters, digits, '_' and '-'")
    if args.version < 1:
        raise ValueError(f"--version must be >= 1, got {args.version}")
    spec = ModelSpec(
        name=args.name,
        inputs=[TensorSpec(n, s, t) for n, s, t in zip(in_names, args.input_shapes, in_types, strict=True)],
        outputs=[
            TensorSpec(n, s, t) for n, s, t in zip(out_names, args.output_shapes, out_types, strict=True)
        ],
        min_batch=args.min_batch,
        opt_batch=args.opt_batch,
        max_batch=args.max_batch,
        preferred_batch_sizes=args.preferred_batch_sizes or [],
        gpu_queue_delay_us=args.max_queue_delay_us,
        cpu_queue_delay_us=args.cpu_max_queue_delay_us,
        gpu_instance_count=args.instance_count,
        cpu_instance_count=args.cpu_instance_count,
        priority_levels=args.priority_levels,
        versions=[args.version],
        precision="int8" if args.int8 else "fp16" if args.fp16 else "fp32",
    )
    spec.validate()
    return spec


def _present_versions(model_dir: Path, version: int) -> list[int]:
    found = (
        {int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()}
        if model_dir.is_dir()
        else set()
    )
    return sorted(found | {version})


def run(args: argparse.Namespace) -> int:
    # Heavy imports here, so `tgw --help` works without the models extra.
    try:
        from app.convert import export, tensorrt
    except ImportError as exc:  # pragma: no cover
        print(f"tgw convert: {exc}", file=sys.stderr)
        return EXIT_USAGE

    def say(msg: str) -> None:
        print(msg, flush=True)

    def fail(msg: str, code: int = EXIT_USAGE) -> int:
        print(f"tgw convert: error: {msg}", file=sys.stderr, flush=True)
        return code

    try:
        spec = build_spec(args)
    except ValueError as exc:
        return fail(str(exc))
    model_dir = args.output_dir / spec.name
    if model_dir.exists() and not args.force:
        return fail(f"model directory {model_dir} already exists (use --force to write into it)")
    calib = None
    if args.int8:
        if args.calib_data is None:
            return fail("--int8 needs --calib-data FILE.npy (representative inputs, shape [N, *input_shape])")
        if not args.calib_data.is_file():
            return fail(f"calibration data not found: {args.calib_data}")
        calib = np.load(args.calib_data)
        want = spec.inputs[0].dims
        if calib.ndim != len(want) + 1 or tuple(calib.shape[1:]) != want:
            return fail(
                f"--calib-data has shape {list(calib.shape)}, expected [N, {', '.join(map(str, want))}]"
            )
    if args.version_policy == "all":
        spec.versions = _present_versions(model_dir, args.version)
    try:
        import torch  # noqa: F401
    except ImportError:
        return fail("PyTorch is not installed: pip install -e '.[models]'")
    prec = tensorrt.precision(args.fp16, args.int8)

    try:
        say(f"[1/5] loading {args.model_class} from {args.module} with {args.checkpoint}")
        done = export.timed(say, "      load")
        cls = export.load_class(args.module, args.model_class)
        state, model_config = export.load_checkpoint(args.checkpoint)
        model = export.build_model(cls, model_config, state)
        n_params = sum(int(v.numel()) for v in state.values())
        say(f"      {cls.__name__}(**{model_config}): {n_params:,} parameters, eval mode")
        export.check_forward(model, spec)
        done()

        with tempfile.TemporaryDirectory(prefix="tgw-convert-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            say(f"[2/5] exporting ONNX (opset {export.OPSET}, dynamic batch axis)")
            done = export.timed(say, "      export")
            export.export_onnx(model, spec, onnx_path)
            size = onnx_path.stat().st_size
            say(f"      {size / 1e6:.2f} MB")
            done()

            batches = sorted({1, spec.max_batch})
            say(f"[3/5] checking ONNX Runtime against PyTorch on random batches of {batches}")
            failed = False
            for r in export.check_parity(model, spec, onnx_path, batches):
                tol = args.tolerance if args.tolerance is not None else r.tolerance
                ok = r.max_abs_err <= tol
                failed |= not ok
                say(
                    f"      batch {r.batch:4d}: max abs error {r.max_abs_err:.3e} (tolerance {tol:.1e}) "
                    f"{'ok' if ok else 'FAIL'}"
                )
            if failed:
                return fail(
                    "ONNX Runtime and PyTorch disagree beyond the tolerance; nothing written", EXIT_FAILED
                )

            torch_path = Path(tmp) / "model.pt"
            say("      tracing TorchScript for the GPU configs (PyTorch + CUDA graphs)")
            export.export_torchscript(model, spec, torch_path)
            say(f"[4/5] writing {model_dir}")
            script = tensorrt.build_script(spec, args.fp16, args.int8, args.workspace_mb)
            export.write_model_dir(
                spec, onnx_path, args.output_dir, args.version, args.force, script, torch_file=torch_path
            )
            say(
                f"      config.pbtxt (TensorRT, {prec.upper()}), configs/cpu.pbtxt (ONNX Runtime on CPU), "
                f"configs/gpu*.pbtxt (PyTorch FP16 on GPU), "
                f"{args.version}/model.onnx, model.pt, model.py, model_torch.py, build_plan.sh"
            )
            if spec.versions != [args.version]:
                say(f"      version_policy: specific versions {spec.versions}")

        say("[5/5] TensorRT engine")
        onnx_final = model_dir / str(args.version) / "model.onnx"
        command = tensorrt.trtexec_command(
            spec, model_dir, args.version, args.fp16, args.int8, args.workspace_mb
        )
        if args.skip_tensorrt or not tensorrt.tensorrt_available():
            why = "--skip-tensorrt given" if args.skip_tensorrt else "TensorRT is not installed here"
            say(f"      {why}: model.plan NOT built. Build it on the target GPU with:\n        {command}")
            say(f"      (or `sh {model_dir}/build_plan.sh`; Dockerfile.triton does this for every model)")
            if args.int8:
                say(
                    "      INT8 needs a calibration cache that only the TensorRT Python API path writes; "
                    "without it build_plan.sh falls back to FP16"
                )
            return EXIT_OK
        plan = model_dir / str(args.version) / "model.plan"
        done = export.timed(say, "      build")
        try:
            tensorrt.build_engine(spec, onnx_final, plan, args.fp16, args.int8, args.workspace_mb, calib)
        except Exception as exc:
            return fail(f"TensorRT build failed: {exc}\n  equivalent command: {command}", EXIT_FAILED)
        done()
        atol, rtol = tensorrt.TRT_TOLERANCE[prec]
        session = export.ort_session(onnx_final)
        worst_fail = False
        for i, bsz in enumerate(sorted({spec.min_batch, spec.opt_batch, spec.max_batch})):
            arrays = export.random_inputs(spec.inputs, bsz, seed=200 + i)
            ref = session.run(
                [t.name for t in spec.outputs], {t.name: a for t, a in zip(spec.inputs, arrays, strict=True)}
            )
            got = tensorrt.run_engine(plan, spec, arrays)
            err = max(float(np.max(np.abs(g - r))) for g, r in zip(got, ref, strict=True))
            tol = atol + rtol * max(float(np.max(np.abs(r))) for r in ref)
            ok = err <= tol
            worst_fail |= not ok
            say(
                f"      TensorRT vs ONNX Runtime, batch {bsz:4d}: max abs error {err:.3e} "
                f"(tolerance {tol:.1e}) "
                f"{'ok' if ok else 'FAIL'}"
            )
        if worst_fail:
            return fail(
                f"the {prec.upper()} plan disagrees with ONNX Runtime beyond the tolerance", EXIT_FAILED
            )
        return EXIT_OK
    except export.ConvertError as exc:
        return fail(str(exc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tgw")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    code: int = args.fn(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
