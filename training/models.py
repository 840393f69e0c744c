"""The two example forecasting architectures.

Both take *raw* values and do their own scaling: each input window is standardised by its own
mean and standard deviation (instance normalisation), the network forecasts in that scaled space and
the forecast is mapped back with the same mean and deviation. Clients never scale anything, and the
models are shift- and scale-equivariant (forecast(a*x + b) == a*forecast(x) + b).

Everything here exports to ONNX (opset 18) and TensorRT without custom ops: attention is written with
plain matmul/softmax instead of ``nn.MultiheadAttention`` (whose fused fast path does not export).
"""

from __future__ import annotations

import math

import torch
from torch import nn

EPS = 1e-5
MIN_SCALE = 1e-3  # a flat window would otherwise divide by ~0


def _standardise(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = x.mean(dim=dim, keepdim=True)
    std = torch.sqrt(((x - mean) ** 2).mean(dim=dim, keepdim=True) + EPS)
    std = torch.clamp(std, min=MIN_SCALE)
    return (x - mean) / std, mean, std


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, nhead: int, dropout: float) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} is not divisible by nhead {nhead}")
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.nhead, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [b, h, t, hd]
        att = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim)), dim=-1)
        y = (self.drop(att) @ v).transpose(1, 2).reshape(b, t, d)
        return self.proj(y)


class EncoderLayer(nn.Module):
    """Pre-norm Transformer encoder layer (attention + GELU feed-forward)."""

    def __init__(self, d_model: int, nhead: int, dim_ff: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, nhead, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(
            nn.Linear(d_model, dim_ff), nn.GELU(), nn.Dropout(dropout), nn.Linear(dim_ff, d_model)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.ff(self.norm2(x)))


class TransformerForecaster(nn.Module):
    """``[batch, input_len, n_features]`` raw values -> ``[batch, horizon]`` raw forecast."""

    def __init__(
        self,
        input_len: int = 20,
        horizon: int = 10,
        n_features: int = 1,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 3,
        dim_ff: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.input_len = input_len
        self.horizon = horizon
        self.n_features = n_features
        self.embed = nn.Linear(n_features, d_model)
        self.pos = nn.Parameter(torch.randn(1, input_len, d_model) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(d_model, nhead, dim_ff, dropout) for _ in range(num_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(input_len * d_model, horizon)
        # Linear skip from the scaled window: the encoder only has to learn the residual.
        self.skip = nn.Linear(input_len, horizon)

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        z, mean, std = _standardise(series, dim=1)  # [b, t, f]
        h = self.embed(z) + self.pos
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h).flatten(1)
        y = self.head(h) + self.skip(z[:, :, 0])  # forecast of feature 0, scaled
        return y * std[:, :, 0] + mean[:, :, 0]


class VAEForecaster(nn.Module):
    """``[batch, 1, input_len]`` raw values -> ``[batch, horizon]`` raw forecast.

    A VAE over the whole trajectory: a convolutional encoder maps the scaled window to ``q(z|x)``
    (mean and log-variance, ``latent_dim``), ``z`` is drawn with the reparameterisation trick while
    training and the decoder reconstructs the window and forecasts the horizon from ``z``. At inference
    (``eval()``) the decoder uses the mean, so outputs are deterministic and cacheable.
    """

    def __init__(
        self,
        input_len: int = 20,
        horizon: int = 10,
        latent_dim: int = 32,
        hidden: int = 128,
        channels: int = 32,
    ) -> None:
        super().__init__()
        self.input_len = input_len
        self.horizon = horizon
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv1d(1, channels, kernel_size=5, padding=2),
            nn.GELU(),
            nn.Conv1d(channels, channels, kernel_size=5, padding=2),
            nn.GELU(),
            nn.Flatten(),
            nn.Linear(channels * input_len, hidden),
            nn.GELU(),
        )
        self.to_mu = nn.Linear(hidden, latent_dim)
        self.to_logvar = nn.Linear(hidden, latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, input_len + horizon),
        )

    def encode(self, z_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(z_in)
        return self.to_mu(h), self.to_logvar(h)

    def trajectory(
        self, series: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training view: (scaled reconstruction+forecast [b, len+h], mu, logvar, scaled input)."""
        z_in, _, _ = _standardise(series, dim=2)
        mu, logvar = self.encode(z_in)
        if self.training:
            latent = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        else:
            latent = mu
        return self.decoder(latent), mu, logvar, z_in

    def forward(self, series: torch.Tensor) -> torch.Tensor:
        z_in, mean, std = _standardise(series, dim=2)  # [b, 1, t]
        mu, logvar = self.encode(z_in)
        latent = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        y = self.decoder(latent)[:, self.input_len :]
        return y * std[:, 0] + mean[:, 0]
