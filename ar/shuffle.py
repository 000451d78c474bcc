"""Token-Shuffle's fuse and unshuffle modules (Ma et al., arXiv 2504.17789): G = s x s
neighbouring tokens share one transformer position, cutting the sequence G-fold.

    fuse       each token's embedding (D) -> a shared Linear to D/G -> the G parts side by side
               (D) -> n residual MLP blocks                               (.., G, D) -> (.., D)
    unshuffle  n residual MLP blocks -> G parts of D/G -> a shared Linear back to D, one state
               per token for the shared head                              (.., D) -> (.., G, D)

With G = 1 both are the identity and hold no parameters, so the model is exactly next-token
prediction. The paper's code is not released: the block structure (pre-norm residual MLPs,
width D) and the default n = 2 are our reading of its description (reference/speculative.md).
The residual branches start at zero (DiT's pattern), so at initialisation fusing is a plain
concatenation of compressed embeddings and unshuffling a plain split.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualMLP(nn.Module):
    """x + Linear(GELU(Linear(LayerNorm(x)))), width `dim` throughout."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))

    def initialize(self) -> None:
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class _Shuffle(nn.Module):
    def __init__(self, dim: int, group: int, blocks: int):
        super().__init__()
        if dim % group:
            raise ValueError(f"token-shuffle fuses {group} tokens into one position of width "
                             f"{dim}: the width must be divisible by {group} (set model.dim)")
        self.group, self.part = group, dim // group
        self.blocks = nn.Sequential(*[ResidualMLP(dim) for _ in range(blocks if group > 1 else 0)])

    def initialize(self) -> None:
        for block in self.blocks:
            block.initialize()


class TokenFuse(_Shuffle):
    def __init__(self, dim: int, group: int, blocks: int):
        super().__init__(dim, group, blocks)
        self.compress = nn.Linear(dim, self.part) if group > 1 else None  # shared by the G tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(.., G, D) token embeddings -> (.., D), one per group."""
        if self.compress is None:
            return x.squeeze(-2)
        x = self.compress(x)  # (.., G, D/G)
        return self.blocks(x.flatten(-2))  # (.., D)


class TokenUnshuffle(_Shuffle):
    def __init__(self, dim: int, group: int, blocks: int):
        super().__init__(dim, group, blocks)
        self.expand = nn.Linear(self.part, dim) if group > 1 else None  # shared by the G tokens

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(.., D) hidden states, one per group -> (.., G, D), one per token."""
        if self.expand is None:
            return h.unsqueeze(-2)
        h = self.blocks(h)
        return self.expand(h.unflatten(-1, (self.group, self.part)))  # (.., G, D)
