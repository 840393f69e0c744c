"""Synthetic time series: sums of sines (random period, phase, amplitude) + trend + offset + noise.

Everything is drawn from a ``numpy.random.Generator`` with a fixed seed, so training and the held-out
set are reproducible. Windows are ``input_len`` past points followed by ``horizon`` future points.
"""

from __future__ import annotations

import numpy as np

INPUT_LEN = 20
HORIZON = 10


def make_windows(
    n: int, seed: int, input_len: int = INPUT_LEN, horizon: int = HORIZON
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(past [n, input_len], future [n, horizon])`` float32 arrays of raw values."""
    rng = np.random.default_rng(seed)
    length = input_len + horizon
    t = np.arange(length, dtype=np.float64)[None, :] + rng.uniform(0, 100, size=(n, 1))
    series = np.zeros((n, length))
    n_sines = rng.integers(1, 3, size=n)  # 1 or 2 components
    for k in range(2):
        active = (n_sines > k)[:, None]
        period = np.exp(rng.uniform(np.log(5.0), np.log(20.0), size=(n, 1)))
        phase = rng.uniform(0, 2 * np.pi, size=(n, 1))
        amp = rng.uniform(0.5, 1.5, size=(n, 1)) / (1 + 2 * k)
        series += active * amp * np.sin(2 * np.pi * t / period + phase)
    trend = rng.uniform(-0.03, 0.03, size=(n, 1)) * (t - t[:, :1])
    offset = rng.uniform(-2.0, 2.0, size=(n, 1))
    noise_std = rng.uniform(0.0, 0.1, size=(n, 1)) * (rng.random((n, 1)) > 0.2)  # 20% noise-free
    series = series + trend + offset + noise_std * rng.standard_normal((n, length))
    scale = np.exp(rng.uniform(np.log(0.5), np.log(2.0), size=(n, 1)))  # raw values of varied size
    series = (series * scale).astype(np.float32)
    return series[:, :input_len], series[:, input_len:]


def sine_check_window(input_len: int = INPUT_LEN, horizon: int = HORIZON) -> tuple[np.ndarray, np.ndarray]:
    """The acceptance check: sin(2*pi*t/10), t = 0..19 -> t = 20..29."""
    t = np.arange(input_len + horizon, dtype=np.float64)
    s = np.sin(2 * np.pi * t / 10).astype(np.float32)
    return s[:input_len], s[input_len:]


def naive_mae(past: np.ndarray, future: np.ndarray) -> float:
    """MAE of the last-value forecast."""
    return float(np.abs(future - past[:, -1:]).mean())
