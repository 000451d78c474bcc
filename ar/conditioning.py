"""Class conditioning as prefix tokens, with a null class for classifier-free guidance.

The null class has id `num_classes`; training replaces labels by it with probability
`train.cond_dropout` (done by the data stream, so that the choice depends on the sample and
not on the number of processes), and sampling feeds it to the unconditional CFG rows.
"""

from __future__ import annotations

import torch
from torch import nn


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int, num_tokens: int = 1):
        super().__init__()
        self.num_classes, self.num_tokens, self.dim = num_classes, num_tokens, dim
        # one extra row: the null class used for the unconditional branch of CFG
        self.embedding_table = nn.Embedding(num_classes + 1, num_tokens * dim)

    @property
    def null_id(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) in [0, num_classes] -> prefix embeddings (B, P, D)."""
        return self.embedding_table(labels).view(labels.shape[0], self.num_tokens, self.dim)
