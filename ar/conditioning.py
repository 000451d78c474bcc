"""What the model is conditioned on: a condition object, and the module that embeds it.

A condition travels through the data stream, the model, the sampler and the scripts as one
object, whether it is a class or a caption:
    ClassCondition(labels (B,))   class ids; the null class (id `num_classes`) is the
                                  unconditional input of classifier-free guidance
    TextCondition(text)           a caption as tokens (B, T) (a unified text + image sequence,
                                  Token-Shuffle's design; tokenizer/text.py) or as a frozen
                                  encoder's features (B, T, C) (LlamaGen's t2i); the null is
                                  the empty caption
Both are left-aligned batches with `with_null(null)`, which appends as many null rows (the
embedder's `null`) for the unconditional CFG rows. Training replaces conditions by the null
with probability `train.cond_dropout` (done by the data stream, so that the choice depends on
the sample and not on the number of processes).

The model turns a condition into prefix embeddings (B, P, D), the condition's tokens at the
start of the sequence (`LabelEmbedder` for class labels, P may be 0; `TextEmbedder` for
captions, P = T), an optional vector (B, 1, D) added to every input (`model.cond_add`, classes
only), and an optional vector (B, 1, D) that drives the blocks' adaLN modulation
(`model.backbone.adaln`, xAR's `class_emb`; classes only), to which flow models add a timestep
embedding per step (`TimestepEmbedder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.text import PAD


@dataclass
class ClassCondition:
    labels: torch.Tensor  # (B,) int64 class ids; the null id means "no class"

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def to(self, device: torch.device | str) -> ClassCondition:
        return ClassCondition(self.labels.to(device, non_blocking=True))

    def with_null(self, null: int) -> ClassCondition:
        """The rows of a CFG batch: these conditions first, then as many null ones."""
        return ClassCondition(torch.cat([self.labels, torch.full_like(self.labels, null)]))

    def __getitem__(self, index) -> ClassCondition:
        return ClassCondition(self.labels[index])

    def repeat_rows(self, times: int) -> ClassCondition:
        """Each row `times` times in a row (a grid row's images share their condition)."""
        return ClassCondition(self.labels.repeat_interleave(times))


@dataclass
class TextCondition:
    text: torch.Tensor  # (B, T) int64 caption tokens, left-padded | (B, T, C) encoder features

    def __len__(self) -> int:
        return self.text.shape[0]

    @property
    def device(self) -> torch.device:
        return self.text.device

    def to(self, device: torch.device | str) -> TextCondition:
        return TextCondition(self.text.to(device, non_blocking=True))

    def with_null(self, null: torch.Tensor) -> TextCondition:
        """These captions first, then as many empty ones (`null`: one row, (T,) or (T, C))."""
        empty = null.to(self.text.device, self.text.dtype).expand_as(self.text)
        return TextCondition(torch.cat([self.text, empty]))

    def __getitem__(self, index) -> TextCondition:
        return TextCondition(self.text[index])

    def repeat_rows(self, times: int) -> TextCondition:
        return TextCondition(self.text.repeat_interleave(times, dim=0))


class LabelEmbedder(nn.Module):
    """Class labels -> prefix tokens (LlamaGen's `cls_embedding`) and/or an adaLN vector; with
    `tied`, the prefix is the adaLN vector itself (VAR's class_emb serves both)."""

    loss_weight = 0.0  # a class prefix has no tokens of its own to predict (TextEmbedder's may)

    def __init__(self, num_classes: int, dim: int, num_tokens: int = 1, vector: bool = False,
                 tied: bool = False):
        super().__init__()
        self.num_classes, self.num_tokens, self.dim = num_classes, num_tokens, dim
        # one extra row in each table: the null class of the unconditional CFG branch
        own_table = num_tokens and not tied  # tied: the prefix repeats the vector (VAR's start token)
        self.embedding_table = nn.Embedding(num_classes + 1, num_tokens * dim) if own_table else None
        self.vector_table = nn.Embedding(num_classes + 1, dim) if vector else None

    @property
    def null(self) -> int:
        """The null class id (the unconditional CFG input)."""
        return self.num_classes

    def forward(self, cond: ClassCondition) -> torch.Tensor:
        """Prefix embeddings (B, P, D); P = 0 gives an empty prefix."""
        if self.embedding_table is None:  # no prefix, or the class vector repeated P times
            return self.vector(cond).expand(len(cond), self.num_tokens, self.dim)
        return self.embedding_table(cond.labels).view(len(cond), self.num_tokens, self.dim)

    def vector(self, cond: ClassCondition) -> torch.Tensor:
        """The adaLN conditioning vector (B, 1, D)."""
        return self.vector_table(cond.labels)[:, None]

    def input_vector(self, cond: ClassCondition) -> None:
        return None  # the class's per-input vector is the model's own table (model.cond_add)


class TextEmbedder(nn.Module):
    """Captions -> prefix embeddings (B, T, D).

    tokens    a caption-token table plus a learned embedding per text position (the image
              positions have 2D RoPE; the text ones are zero-rotated, as LlamaGen's prefix, so
              the caption's order comes from this table); with `loss_weight`, a linear head
              predicts each caption token from the position before it
    features  a frozen encoder's features through LlamaGen's caption MLP (Linear, tanh-GELU,
              Linear); the encoder's own positions are in its features
With `pooled` (model.cond_add), the mean of the caption's embeddings (tokens: its non-padding
tokens' own table rows; features: the projected non-zero rows) through a Linear is added to
every image input, as the class embedding is for class models: a bag of words every position
reads without attending to the caption (cf. the pooled text vector of SDXL and Imagen).
The null condition (the empty caption: all padding, or the encoder's features of "") is a
buffer saved with the weights, so sampling needs no cache.
"""

    vector_table = None  # no adaLN vector from a caption

    def __init__(self, text, dim: int, loss_weight: float = 0.0, pooled: bool = False):
        super().__init__()
        self.kind, self.num_tokens, self.dim = text.kind, text.max_tokens, dim
        self.loss_weight = loss_weight
        if text.kind == "tokens":
            self.tokens = nn.Embedding(text.vocab_size, dim)
            self.positions = nn.Parameter(torch.zeros(text.max_tokens, dim))  # (T, D)
            self.register_buffer("null_text", torch.full((text.max_tokens,), PAD, dtype=torch.long))
            self.output = nn.Linear(dim, text.vocab_size, bias=False) if loss_weight else None
        else:
            if loss_weight:
                raise ValueError("model.text_loss predicts caption tokens, but this cache holds "
                                 "encoder features (text.kind=encoder): set model.text_loss=0")
            self.proj = nn.Sequential(nn.Linear(text.channels, dim), nn.GELU(approximate="tanh"),
                                      nn.Linear(dim, dim))
            # filled from the cache's null.npy by the trainer; saved with the weights
            self.register_buffer("null_text", torch.zeros(text.max_tokens, text.channels))
        self.pool = nn.Linear(dim, dim) if pooled else None

    @property
    def null(self) -> torch.Tensor:
        """The empty caption's row: (T,) tokens or (T, C) features."""
        return self.null_text

    def initialize(self) -> None:
        if self.kind == "tokens":
            nn.init.normal_(self.positions, std=0.02)
            if self.output is not None:
                nn.init.zeros_(self.output.weight)

    def forward(self, cond: TextCondition) -> torch.Tensor:
        if self.kind == "tokens":
            return self.tokens(cond.text) + self.positions.to(self.tokens.weight.dtype)  # (B, T, D)
        return self.proj(cond.text.to(self.proj[0].weight.dtype))  # (B, T, D)

    def input_vector(self, cond: TextCondition) -> torch.Tensor | None:
        """The pooled caption (B, 1, D) added to every input, or None without `pooled`."""
        if self.pool is None:
            return None
        if self.kind == "tokens":
            x, present = self.tokens(cond.text), cond.text != PAD  # (B, T, D), (B, T)
        else:
            x, present = self.proj(cond.text.to(self.proj[0].weight.dtype)), cond.text.abs().sum(-1) > 0
        weights = present.to(x.dtype)[..., None]  # (B, T, 1): padding rows count for nothing
        mean = (x * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
        return self.pool(mean)  # (B, 1, D); the empty caption pools to 0, then the bias

    def loss(self, h: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """Cross-entropy of the caption's tokens, each predicted from the position before it
        (h (B, T, D): the prefix's hidden states); padding is not a target, so empty
        captions add nothing."""
        logits = self.output(h[:, :-1]).float()  # (B, T - 1, V)
        target = cond.text[:, 1:]
        total = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD,
                                reduction="sum")
        return total / (target != PAD).sum().clamp(min=1)


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
