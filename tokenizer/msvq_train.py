"""Training-side statistics of the multi-scale residual VQ (tokenizer/msvq.py): the code
histogram of every scale, and the per-scale usage that tokenizer/train.py logs and reports
(VAR kept an EMA of hits per scale, `ema_vocab_hit_SV`, for the same purpose).

Usage over a window of batches and dead-code restarts are the VQ's (tokenizer/quantizer.py
CodeTracker) over one row per scale: a code is dead when no scale chose it in the window.
"""

from __future__ import annotations

import torch

from tokenizer.quantizer import code_usage


def scale_code_stats(indices: list[torch.Tensor], codebook_size: int, latents: torch.Tensor) -> dict:
    """One batch's statistics from its indices per scale (B, pn_k^2): `counts` (S, V), `usage`
    and `perplexity` over all scales together, `usage_per_scale` (S,), and `latents` (N, D),
    the rest vectors quantised at every scale (the candidates for dead-code restarts)."""
    counts = torch.stack([torch.bincount(i.flatten(), minlength=codebook_size) for i in indices])  # (S, V)
    return {"counts": counts, **code_usage(counts), "usage_per_scale": usage_per_scale(counts),
            "latents": latents}


def usage_per_scale(counts: torch.Tensor) -> torch.Tensor:
    """(S, V) histogram -> (S,) fraction of the codebook each scale chose."""
    return (counts > 0).float().mean(1)


def scale_scalars(counts: torch.Tensor) -> dict:
    """The per-scale usage to log, `usage/scale_k`, from a (S, V) histogram."""
    return {f"usage/scale_{k}": u for k, u in enumerate(usage_per_scale(counts).tolist())}


def rounded(values, digits: int = 4) -> list[float]:
    """Per-scale values as a short JSON list."""
    return [round(float(v), digits) for v in values]
