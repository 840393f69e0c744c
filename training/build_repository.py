"""Regenerate the example models in model_repository/ from the training checkpoints with `tgw convert`.

    python -m training.train transformer && python -m training.train vae --snapshot-at 1000
    python -m training.build_repository

The shipped models are produced by the same conversion tool an ML engineer uses. The forecast ensemble
and its pre/post-process models are hand-written (model_repository/forecast*), not generated.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from app.convert.cli import main as convert

ROOT = Path(__file__).resolve().parent.parent
CKPT = ROOT / "training" / "checkpoints"
MODULE = ROOT / "training" / "models.py"


def build(output_dir: Path, skip_tensorrt: bool = True) -> int:
    common = ["--module", str(MODULE), "--output-dir", str(output_dir), "--force"]
    if skip_tensorrt:
        common.append("--skip-tensorrt")
    jobs = [
        [
            "--checkpoint",
            str(CKPT / "transformer.pth"),
            "--model-class",
            "TransformerForecaster",
            "--name",
            "transformer_timeseries",
            "--input-shapes",
            "20,1",
            "--output-shapes",
            "10",
        ],
        # two versions: 1 = the VAE part-way through training, 2 = fully trained; both served
        [
            "--checkpoint",
            str(CKPT / "vae_step1000.pth"),
            "--model-class",
            "VAEForecaster",
            "--name",
            "vae_timeseries",
            "--input-shapes",
            "1,20",
            "--output-shapes",
            "10",
            "--version",
            "1",
            "--version-policy",
            "all",
        ],
        [
            "--checkpoint",
            str(CKPT / "vae.pth"),
            "--model-class",
            "VAEForecaster",
            "--name",
            "vae_timeseries",
            "--input-shapes",
            "1,20",
            "--output-shapes",
            "10",
            "--version",
            "2",
            "--version-policy",
            "all",
        ],
    ]
    for job in jobs:
        code = convert(["convert", *job, *common])
        if code:
            return code
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=ROOT / "model_repository")
    p.add_argument(
        "--tensorrt", action="store_true", help="also build model.plan where TensorRT is installed"
    )
    a = p.parse_args(argv)
    return build(a.output_dir, skip_tensorrt=not a.tensorrt)


if __name__ == "__main__":
    raise SystemExit(main())
