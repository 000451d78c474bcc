"""Discrete head: a linear map to codebook logits, cross-entropy loss, categorical draws.

It predicts every element of a step independently given the hidden states (B, G, D): one
token per step for next-token, a whole group for the next-X orders.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ar.logits import DrawSettings, guide, process_logits, sample_categorical
from common.config import check_fields


@dataclass
class TokenHeadConfig:
    label_smoothing: float = 0.0  # cross-entropy label smoothing (MaskGIT trains with 0.1; LlamaGen 0)
    bias: bool = False  # a bias on the output layer (VAR's head has one; LlamaGen's not)

    def validate(self) -> None:
        check_fields(self, "model.token_head.", {"label_smoothing": "[0, 1)"})


class TokenHead(nn.Module):
    continuous = False  # predicts codebook indices

    def __init__(self, dim: int, vocab_size: int, cfg: TokenHeadConfig | None = None):
        super().__init__()
        self.cfg = cfg or TokenHeadConfig()
        self.vocab_size = vocab_size
        self.output = nn.Linear(dim, vocab_size, bias=self.cfg.bias)

    @staticmethod
    def output_size(spec) -> int:
        return spec.vocab_size  # a logit per code

    def initialize(self) -> None:
        # zero output: training starts from uniform predictions (LlamaGen, DiT)
        nn.init.zeros_(self.output.weight)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.output(h).float()

    def training_pair(self, seq: torch.Tensor, step_of: torch.Tensor, draws=None):
        """(inputs, target, t): a discrete model is teacher-forced on the clean codes."""
        return seq, seq, None

    def loss(self, h: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """h (B, N, D) hidden states predicting target (B, N); metrics are free-form."""
        logits = self.logits(h)  # (B, N, V) in float32 for a stable log-softmax
        loss = F.cross_entropy(logits.flatten(0, 1), target.flatten(),
                               label_smoothing=self.cfg.label_smoothing)
        acc = (logits.argmax(-1) == target).float().mean()
        return loss, {"acc": acc.detach()}

    def step_logits(self, h: torch.Tensor, cfg_scale: float | torch.Tensor | None,
                    settings: DrawSettings) -> torch.Tensor:
        """Filtered logits (B, G, V) of one step from h (R, G, D); with CFG the conditional
        rows come first and R = 2B."""
        logits = guide(self.logits(h), cfg_scale)  # (B, G, V)
        return process_logits(logits, settings.temperature, settings.top_k, settings.top_p)

    @torch.no_grad()
    def probs(self, h: torch.Tensor, cfg_scale, settings: DrawSettings) -> torch.Tensor:
        """The distribution a draw samples from, (B, G, V) (speculative decoding needs it)."""
        logits = self.step_logits(h, cfg_scale, settings)
        if settings.temperature == 0:
            return F.one_hot(logits.argmax(-1), self.vocab_size).float()
        return logits.softmax(-1)

    @torch.no_grad()
    def draw(self, h: torch.Tensor, cfg_scale, settings: DrawSettings, uniform: torch.Tensor) -> torch.Tensor:
        """One step's tokens (B, G); `uniform` (B, G, V) in (0, 1) is the step's noise."""
        logits = self.step_logits(h, cfg_scale, settings)
        return sample_categorical(logits, uniform, settings.temperature)
