"""What the model is conditioned on: a condition object, and the module that embeds it.

A condition travels through the data stream, the model, the sampler and the scripts as one
object, so that text can replace class labels later without touching them. Class labels:
`ClassCondition(labels)`; the null class (id `num_classes`) is the unconditional input of
classifier-free guidance. Training replaces labels by it with probability `train.cond_dropout`
(done by the data stream, so that the choice depends on the sample and not on the number of
processes), and sampling feeds it to the unconditional CFG rows.

The model turns a condition into prefix embeddings (B, P, D), the condition's tokens at the
start of the sequence (`LabelEmbedder` for class labels), and an optional vector (B, 1, D)
added to every input (`model.cond_add`); both are made once per batch (`ARModel.condition`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ClassCondition:
    labels: torch.Tensor  # (B,) int64 class ids; the null id means "no class"

    def __len__(self) -> int:
        return self.labels.shape[0]

    def to(self, device: torch.device | str) -> ClassCondition:
        return ClassCondition(self.labels.to(device, non_blocking=True))

    def with_null(self, null_id: int) -> ClassCondition:
        """The rows of a CFG batch: these conditions first, then as many null ones."""
        return ClassCondition(torch.cat([self.labels, torch.full_like(self.labels, null_id)]))


class LabelEmbedder(nn.Module):
    """Class labels -> prefix tokens (LlamaGen's `cls_embedding`)."""

    def __init__(self, num_classes: int, dim: int, num_tokens: int = 1):
        super().__init__()
        self.num_classes, self.num_tokens, self.dim = num_classes, num_tokens, dim
        # one extra row: the null class used for the unconditional branch of CFG
        self.embedding_table = nn.Embedding(num_classes + 1, num_tokens * dim)

    @property
    def null_id(self) -> int:
        return self.num_classes

    def forward(self, cond: ClassCondition) -> torch.Tensor:
        """Prefix embeddings (B, P, D)."""
        return self.embedding_table(cond.labels).view(len(cond), self.num_tokens, self.dim)
