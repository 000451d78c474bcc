"""The flow time's embedding (xAR's per-step timestep in the adaLN vector)."""

from __future__ import annotations

import math

import torch
from torch import nn


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> (.., D): a 256-wide sinusoid of the integer index
    k = trunc(1000 t), then Linear, SiLU, Linear (DiT's embedder, xAR's use of it).

    Follows xAR `models/xar.py` (TimestepEmbedder as in DiT): the index is computed in float32
    and truncated, not rounded (1000 * 0.862 -> 862), and the sinusoid is [cos, sin] in
    float32, so that released weights see the indices they were trained on.
    """

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        k = (t.float() * 1000).trunc()  # float32 product, truncated
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
        angles = k[..., None] * freqs  # (.., half)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (.., freq_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))
