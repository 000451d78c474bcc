"""Logits processing as pure functions: CFG combination, temperature, top-k, top-p, and
categorical sampling without a host synchronisation (the guidance schedules over the steps are
in sampling/guidance.py).

All functions take and return tensors on the model's device and never call `.item()`, so a
decode loop built from them issues no host sync per token on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import check_fields


@dataclass
class DrawSettings:
    """How a head draws a step's tokens: what `sampling.settings.SamplingConfig` holds for it."""

    temperature: float = 1.0  # softmax temperature; 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # nucleus sampling mass; 1.0 = all

    def validate(self) -> None:
        check_fields(self, "sampling.", {"temperature": ">= 0", "top_k": ">= 0", "top_p": "(0, 1]"})


def combine_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def guide(values: torch.Tensor, scale: float | torch.Tensor | None) -> torch.Tensor:
    """CFG over the rows of a guided batch, conditional rows first, as the samplers feed them
    (logits, velocities, drifts alike); None: an unguided batch, returned as it is."""
    if scale is None:
        return values
    cond, uncond = values.chunk(2)
    return combine_cfg(cond, uncond, scale)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit outside the k largest of each row to -inf (k <= 0 keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability mass
    reaches p (the most likely token is always kept); p >= 1 keeps all."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # mass strictly before each token: a token is dropped once that mass already reaches p
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then top-p, in float32. temperature 0 means greedy."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    return top_p_mask(top_k_mask(logits, top_k), top_p)


def sample_categorical(logits: torch.Tensor, uniform: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Draw one token per row from softmax(logits) with the exponential-race trick.

    argmax(p_i / E_i) with E_i ~ Exp(1) is distributed as Categorical(p); it needs no
    `torch.multinomial` (which syncs with the host) and takes its randomness from `uniform`
    (B, V) in (0, 1), so the caller decides where the randomness comes from.
    temperature 0 picks the most likely token.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = logits.float().softmax(-1)
    race = probs / (-torch.log(uniform))
    return race.argmax(-1)
