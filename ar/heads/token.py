"""Next-token head: a linear map to codebook logits, cross-entropy loss, categorical sampling."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sampling.logits import combine_cfg, process_logits, sample_categorical


class TokenHead(nn.Module):
    def __init__(self, dim: int, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.output = nn.Linear(dim, vocab_size, bias=False)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(h).float()

    def loss(self, h: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        logits = self.logits(h)  # (B, N, V) in float32 for a stable log-softmax
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten())
        acc = (logits.argmax(-1) == target).float().mean()
        return loss, {"acc": acc.detach()}

    @torch.no_grad()
    def sample(self, h: torch.Tensor, cfg_scale: float | None, settings,
               uniform: Callable[[int], torch.Tensor]) -> torch.Tensor:
        logits = self.logits(h)  # (R, V)
        if cfg_scale is not None:
            cond, uncond = logits.chunk(2)  # conditional rows first
            logits = combine_cfg(cond, uncond, cfg_scale)  # (B, V)
        logits = process_logits(logits, settings.temperature, settings.top_k, settings.top_p)
        return sample_categorical(logits, uniform(self.vocab_size), settings.temperature)
