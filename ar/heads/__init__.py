"""Prediction heads. A head owns its training loss and its per-step sampler (MAR's DiffLoss
pattern), so the backbone never knows whether it predicts codebook indices, groups of
tokens or continuous latents.

Interface:
    head.loss(h, target) -> (loss, metrics)       h (B, N, D) hidden states, target (B, N)
    head.sample(h, cfg_scale, settings, uniform) -> tokens (B,)
        h (B, D), or (2B, D) with the conditional rows first when cfg_scale is not None;
        `uniform(size)` returns (B, size) noise in (0, 1) for this step.
"""

from __future__ import annotations

from ar.heads.token import TokenHead

HEADS = {"token": TokenHead}

__all__ = ["HEADS", "TokenHead"]
