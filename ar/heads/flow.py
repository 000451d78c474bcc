"""Continuous head: a linear map from hidden states to flow-matching velocities (xAR).

Path and target (rectified flow, xAR's convention): t = 1 is pure noise and t = 0 the data,
x_t = (1 - t) x + t eps, and the network predicts the velocity v = eps - x with a mean squared
error. Noisy context learning: every step of every sample gets its own t, drawn logit-normal
(sigmoid of a normal), so training never shows the model clean context; sampling feeds clean
context and the model generalises to it (xAR, section 3.2).

The head prepares the training pair (`training_pair`: noisy inputs, target, per-step t) and
owns the loss; integrating a step's velocity field (ODE or SDE) calls the whole backbone many
times per step, so it lives in `sampling/flow.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.config import check_fields


@dataclass
class FlowHeadConfig:
    t_mean: float = 0.0  # location of the logit-normal training t (xAR: 0)
    t_std: float = 1.0  # scale of the logit-normal training t (xAR: 1)

    def validate(self) -> None:
        check_fields(self, "model.flow_head.", {"t_std": "> 0"})


class FlowHead(nn.Module):
    continuous = True  # predicts latents (B, N, C), not codebook indices

    def __init__(self, dim: int, channels: int, cfg: FlowHeadConfig | None = None):
        super().__init__()
        self.cfg = cfg or FlowHeadConfig()
        self.channels = channels
        self.output = nn.Linear(dim, channels)  # xAR's `pred`

    @staticmethod
    def output_size(spec) -> int:
        return spec.latent_channels  # a velocity per channel

    def initialize(self) -> None:
        # zero output (DiT's final layer): training starts from v = 0
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def velocity(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(h).float()  # (B, T, C)

    def draw_t(self, batch: int, steps: int, device) -> torch.Tensor:
        """Training times (B, S), one per step: sigmoid(N(t_mean, t_std^2))."""
        z = torch.randn(batch, steps, device=device) * self.cfg.t_std + self.cfg.t_mean
        return torch.sigmoid(z)

    def training_pair(self, seq: torch.Tensor, step_of: torch.Tensor, draws=None):
        """(noisy inputs x_t (B, N, C), target velocity (B, N, C), t (B, S)) for clean latents
        seq (B, N, C); `draws` = (t (B, S), eps (B, N, C)) replaces the random draws."""
        if draws is None:
            t = self.draw_t(seq.shape[0], int(step_of.max()) + 1, seq.device)
            eps = torch.randn_like(seq)
        else:
            t, eps = draws
        t_tok = t[:, step_of.to(seq.device)][..., None].to(seq.dtype)  # (B, N, 1): its step's t
        return (1 - t_tok) * seq + t_tok * eps, eps - seq, t

    def loss(self, h: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Mean squared error of the predicted velocity over every token and channel."""
        loss = (self.velocity(h) - target.float()).pow(2).mean()
        return loss, {}
