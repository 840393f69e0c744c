"""Train an example forecaster on synthetic series, report MAE vs the naive forecast, save a checkpoint.

    python -m training.train transformer   # ~3.5 min on 2 CPU cores
    python -m training.train vae --snapshot-at 1000   # ~1 min

The checkpoint (``{"state_dict", "model_config", "metrics"}``) is what ``tgw convert`` takes;
``python -m training.build_repository`` turns the checkpoints into ``model_repository/``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.data import HORIZON, INPUT_LEN, make_windows, naive_mae, sine_check_window
from training.models import TransformerForecaster, VAEForecaster

ROOT = Path(__file__).resolve().parent
CHECKPOINTS = ROOT / "checkpoints"

# name -> (class, model_config, input shape per item as a function of the window)
ARCHS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    "transformer": (
        TransformerForecaster,
        {
            "input_len": INPUT_LEN,
            "horizon": HORIZON,
            "d_model": 64,
            "nhead": 4,
            "num_layers": 3,
            "dim_ff": 128,
            "dropout": 0.1,
        },
    ),
    "vae": (VAEForecaster, {"input_len": INPUT_LEN, "horizon": HORIZON, "latent_dim": 32, "hidden": 128}),
}
DEFAULTS = {
    "transformer": {"steps": 1500, "batch": 256, "lr": 2e-3},
    "vae": {"steps": 4000, "batch": 256, "lr": 2e-3},
}


def to_model_input(arch: str, past: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(past)
    return x[:, :, None] if arch == "transformer" else x[:, None, :]


def loss_fn(
    arch: str, model: nn.Module, past: torch.Tensor, future: torch.Tensor, beta: float
) -> torch.Tensor:
    """L1 (the metric) in each trajectory's own scale, so large-amplitude series don't dominate;
    + beta * KL for the VAE. The scale is the std of past+future: stable even for a flat past window."""
    flat = past.reshape(past.shape[0], -1)
    full = torch.cat([flat, future], 1)
    std = full.std(1, keepdim=True).clamp_min(1e-3)
    if arch == "vae":
        assert isinstance(model, VAEForecaster)
        traj, mu, logvar, _ = model.trajectory(past)
        # the decoder works in the past window's scale; compare in the trajectory's scale
        p_mean = flat.mean(1, keepdim=True)
        p_std = torch.sqrt(flat.var(1, unbiased=False, keepdim=True) + 1e-5).clamp_min(1e-3)
        err = (traj * p_std + p_mean - full).abs() / std
        # the forecast part matters most; the reconstruction keeps it a proper VAE
        rec = err[:, INPUT_LEN:].mean() + 0.3 * err[:, :INPUT_LEN].mean()
        kl = -0.5 * torch.mean(torch.sum(1 + logvar - mu**2 - logvar.exp(), dim=1))
        return rec + beta * kl
    pred = model(past)
    return ((pred - future).abs() / std).mean()


@torch.no_grad()
def evaluate(arch: str, model: nn.Module, past: np.ndarray, future: np.ndarray) -> dict[str, float]:
    model.eval()
    pred = model(to_model_input(arch, past)).numpy()
    mae = float(np.abs(pred - future).mean())
    naive = naive_mae(past, future)
    s_past, s_future = sine_check_window()
    s_pred = model(to_model_input(arch, s_past[None])).numpy()[0]
    return {
        "mae": mae,
        "naive_mae": naive,
        "improvement": 1 - mae / naive,
        "sine_mae": float(np.abs(s_pred - s_future).mean()),
    }


def train(
    arch: str,
    steps: int,
    batch: int,
    lr: float,
    seed: int = 0,
    n_train: int = 200_000,
    snapshot_at: int | None = None,
    out: Path | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    cls, cfg = ARCHS[arch]
    model = cls(**cfg)
    past, future = make_windows(n_train, seed=seed)
    val_past, val_future = make_windows(5_000, seed=10_000 + seed)  # held out: different seed
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    rng = np.random.default_rng(seed + 1)
    t0 = time.time()
    snapshots: dict[str, Any] = {}
    for step in range(1, steps + 1):
        model.train()
        idx = rng.integers(0, n_train, size=batch)
        xb = to_model_input(arch, past[idx])
        yb = torch.from_numpy(future[idx])
        beta = min(1.0, step / (steps / 2)) * 1e-3
        loss = loss_fn(arch, model, xb, yb, beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps:
            m = evaluate(arch, model, val_past, val_future)
            print(
                f"[{arch}] step {step:5d}/{steps} loss {loss.item():.4f}  held-out MAE {m['mae']:.4f} "
                f"(naive {m['naive_mae']:.4f}, {m['improvement']:+.1%})  sine MAE {m['sine_mae']:.4f}  "
                f"{time.time() - t0:.0f}s",
                flush=True,
            )
        if snapshot_at is not None and step == snapshot_at:
            snapshots["snapshot"] = {
                "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
                "metrics": evaluate(arch, model, val_past, val_future),
                "step": step,
            }
    metrics = evaluate(arch, model, val_past, val_future)
    metrics["train_seconds"] = time.time() - t0
    metrics["steps"] = steps
    ckpt = {"state_dict": model.state_dict(), "model_config": cfg, "metrics": metrics}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ckpt, out)
        if snapshots:
            snap = snapshots["snapshot"]
            torch.save(
                {
                    "state_dict": snap["state_dict"],
                    "model_config": cfg,
                    "metrics": {**snap["metrics"], "steps": snap["step"]},
                },
                out.with_name(out.stem + f"_step{snap['step']}.pth"),
            )
    print(
        f"[{arch}] final held-out MAE {metrics['mae']:.4f} vs naive last-value {metrics['naive_mae']:.4f} "
        f"({metrics['improvement']:.1%} better); sine sin(2*pi*t/10) MAE {metrics['sine_mae']:.4f}; "
        f"{metrics['train_seconds']:.0f}s"
    )
    return {"model": model, "metrics": metrics}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arch", choices=sorted(ARCHS))
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=200_000)
    p.add_argument("--snapshot-at", type=int, help="also save the model at this step (an older version)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (1 on a busy machine)")
    p.add_argument("--out", type=Path, help="checkpoint path (default training/checkpoints/<arch>.pth)")
    a = p.parse_args(argv)
    d = DEFAULTS[a.arch]
    res = train(
        a.arch,
        a.steps or d["steps"],
        a.batch or d["batch"],
        a.lr or d["lr"],
        a.seed,
        a.n_train,
        a.snapshot_at,
        a.out or CHECKPOINTS / f"{a.arch}.pth",
        a.threads,
    )
    print(json.dumps(res["metrics"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
