"""The caption as tokens in the sequence (a unified text + image sequence, Token-Shuffle's
design; tokenizer/text.py): a caption-token table plus a learned embedding per text position
(the image positions have 2D RoPE; the text ones are zero-rotated, as LlamaGen's prefix, so the
caption's order comes from this table). With `model.text_condition.loss`, a linear head
predicts each caption token from the position before it."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from ar.conditioning.captions import CaptionEmbedder
from ar.conditioning.rows import TextCondition
from tokenizer.text import PAD, CaptionTokenizer, left_pad


@functools.lru_cache(maxsize=2)
def _caption_tokenizer(kind: str, state: str) -> CaptionTokenizer:
    return CaptionTokenizer(kind, state)


class CaptionTokens(CaptionEmbedder):
    def __init__(self, spec, dim: int):
        super().__init__()
        text = spec.text
        self.spec, self.num_tokens, self.dim = spec, text.max_tokens, dim
        self.loss_weight = spec.model.text_condition.loss
        self.tokens = nn.Embedding(text.vocab_size, dim)
        self.positions = nn.Parameter(torch.zeros(text.max_tokens, dim))  # (T, D)
        self.register_buffer("null_text", torch.full((text.max_tokens,), PAD, dtype=torch.long))
        self.output = nn.Linear(dim, text.vocab_size, bias=False) if self.loss_weight else None
        self.pool = nn.Linear(dim, dim) if spec.model.text_condition.pooled else None

    def initialize(self) -> None:
        nn.init.normal_(self.positions, std=0.02)
        if self.output is not None:
            nn.init.zeros_(self.output.weight)

    def forward(self, cond: TextCondition) -> torch.Tensor:
        return self.tokens(cond.text) + self.positions.to(self.tokens.weight.dtype)  # (B, T, D)

    def pool_rows(self, cond: TextCondition) -> tuple[torch.Tensor, torch.Tensor]:
        """What pooling averages: the tokens' own table rows (B, T, D), and which are not padding."""
        return self.tokens(cond.text), cond.text != PAD

    def loss(self, h: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """Cross-entropy of the caption's tokens, each predicted from the position before it
        (h (B, T, D): the prefix's hidden states); padding is not a target, so empty
        captions add nothing."""
        logits = self.output(h[:, :-1]).float()  # (B, T - 1, V)
        target = cond.text[:, 1:]
        total = F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD,
                                reduction="sum")
        return total / (target != PAD).sum().clamp(min=1)

    def prompt_rows(self, prompts: list[str], device, **_) -> TextCondition:
        """Prompts tokenized exactly as the training captions were, with the caption tokenizer
        stored in the weights: (B, T), left-padded."""
        text = self.spec.text
        rows = _caption_tokenizer(text.tokenizer, text.tokenizer_json).encode_batch(prompts)
        self.check_length(prompts, [len(ids) for ids in rows])
        return TextCondition(torch.from_numpy(left_pad(rows, self.num_tokens)).long().to(device))
