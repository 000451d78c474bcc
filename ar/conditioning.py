"""What the model is conditioned on: a condition object, and the module that embeds it.

A condition travels through the data stream, the model, the sampler and the scripts as one
object, so that text can replace class labels later without touching them. Class labels:
`ClassCondition(labels)`; the null class (id `num_classes`) is the unconditional input of
classifier-free guidance. Training replaces labels by it with probability `train.cond_dropout`
(done by the data stream, so that the choice depends on the sample and not on the number of
processes), and sampling feeds it to the unconditional CFG rows.

The model turns a condition into prefix embeddings (B, P, D), the condition's tokens at the
start of the sequence (`LabelEmbedder` for class labels; P may be 0), an optional vector
(B, 1, D) added to every input (`model.cond_add`), and an optional vector (B, 1, D) that drives
the blocks' adaLN modulation (`model.backbone.adaln`, xAR's `class_emb`), to which flow models
add a timestep embedding per step (`TimestepEmbedder`).
"""

from __future__ import annotations

import math
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
    """Class labels -> prefix tokens (LlamaGen's `cls_embedding`) and/or an adaLN vector; with
    `tied`, the prefix is the adaLN vector itself (VAR's class_emb serves both)."""

    def __init__(self, num_classes: int, dim: int, num_tokens: int = 1, vector: bool = False,
                 tied: bool = False):
        super().__init__()
        self.num_classes, self.num_tokens, self.dim = num_classes, num_tokens, dim
        # one extra row in each table: the null class of the unconditional CFG branch
        own_table = num_tokens and not tied  # tied: the prefix repeats the vector (VAR's start token)
        self.embedding_table = nn.Embedding(num_classes + 1, num_tokens * dim) if own_table else None
        self.vector_table = nn.Embedding(num_classes + 1, dim) if vector else None

    @property
    def null_id(self) -> int:
        return self.num_classes

    def forward(self, cond: ClassCondition) -> torch.Tensor:
        """Prefix embeddings (B, P, D); P = 0 gives an empty prefix."""
        if self.embedding_table is None:  # no prefix, or the class vector repeated P times
            return self.vector(cond).expand(len(cond), self.num_tokens, self.dim)
        return self.embedding_table(cond.labels).view(len(cond), self.num_tokens, self.dim)

    def vector(self, cond: ClassCondition) -> torch.Tensor:
        """The adaLN conditioning vector (B, 1, D)."""
        return self.vector_table(cond.labels)[:, None]


class TimestepEmbedder(nn.Module):
    """Flow time t in [0, 1] -> (.., D): a 256-wide sinusoid of the integer index
    k = trunc(1000 t), then Linear, SiLU, Linear (DiT's embedder, xAR's use of it).

    Follows xAR `models/xar.py` (TimestepEmbedder as in DiT): the index is computed in float32
    and truncated, not rounded (1000 * 0.862 -> 862), and the sinusoid is [cos, sin] in
    float32, so that released weights see the indices they were trained on.
    """

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoid(self, t: torch.Tensor) -> torch.Tensor:
        k = (t.float() * 1000).trunc()  # float32 product, truncated
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
        angles = k[..., None] * freqs  # (.., half)
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (.., freq_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t).to(self.mlp[0].weight.dtype))
