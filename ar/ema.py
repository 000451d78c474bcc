"""Exponential moving average of the generator's parameters, the weights we sample from.

Published AR/diffusion numbers are measured on EMA weights (MAR issue #98: FID ~6 without,
2.5 with), so export uses them by default. A short warm-up (decay = min(decay, (1+s)/(10+s)))
lets short runs, such as the quickstart, benefit too; long runs are unaffected.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        for p in self.model.parameters():
            p.data = p.data.float()  # keep the average in fp32 whatever the training dtype

    def rate(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        d = self.rate(step)
        ema_params = list(self.model.parameters())
        params = [p.detach().float() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
