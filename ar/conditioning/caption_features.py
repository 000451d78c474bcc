"""The caption as a frozen text encoder's features (LlamaGen's t2i): the features (B, T, C)
through LlamaGen's caption MLP (Linear, tanh-GELU, Linear); the encoder's own positions are in
its features. Prompts are encoded with the encoder the cache was made with (recorded in the
weights, or `text_encoder=FOLDER`)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from ar.conditioning.captions import CaptionEmbedder
from ar.conditioning.rows import TextCondition


@functools.lru_cache(maxsize=1)
def _encoder(path: str, device: str):
    from tokenizer.text_encoder import load_text_encoder

    return load_text_encoder(path, device=device)


def text_encoder_for(spec, override: str | None, log=None):
    """The frozen encoder that turns prompts into features: `override` or the recorded folder;
    another encoder than the training one is refused unless given explicitly (then a warning)."""
    path = override or spec.text.encoder
    encoder = _encoder(str(path), "cpu")
    if encoder.identity().get("sha256") != spec.text.encoder_sha256:
        msg = (f"text encoder {path} is not the one the generator was trained with "
               f"(sha256 differs)")
        if override is None:
            raise ValueError(msg + "; pass text_encoder=FOLDER to use it anyway")
        if log:
            log.warning(msg)
    return encoder


class CaptionFeatures(CaptionEmbedder):
    def __init__(self, spec, dim: int):
        super().__init__()
        text = spec.text
        if spec.model.text_condition.loss:
            raise ValueError("model.text_condition.loss predicts caption tokens, but this cache "
                             "holds encoder features (text.kind=encoder): set it to 0")
        self.spec, self.num_tokens, self.dim = spec, text.max_tokens, dim
        self.proj = nn.Sequential(nn.Linear(text.channels, dim), nn.GELU(approximate="tanh"),
                                  nn.Linear(dim, dim))
        # filled from the cache's null.npy by the trainer; saved with the weights
        self.register_buffer("null_text", torch.zeros(text.max_tokens, text.channels))
        self.pool = nn.Linear(dim, dim) if spec.model.text_condition.pooled else None

    def forward(self, cond: TextCondition) -> torch.Tensor:
        return self.proj(cond.text.to(self.proj[0].weight.dtype))  # (B, T, D)

    def pool_rows(self, cond: TextCondition) -> tuple[torch.Tensor, torch.Tensor]:
        """What pooling averages: the projected features (B, T, D), and which rows are not zero."""
        return self.forward(cond), cond.text.abs().sum(-1) > 0

    def prompt_rows(self, prompts: list[str], device, text_encoder: str | None = None,
                    log=None, encoder=None) -> TextCondition:
        """(B, T, C) features of the prompts from the frozen encoder."""
        encoder = encoder or text_encoder_for(self.spec, text_encoder, log)
        self.check_length(prompts, encoder.count_tokens(prompts))
        features, _ = encoder.features(prompts, self.num_tokens)
        return TextCondition(torch.from_numpy(features).float().to(device))

    @staticmethod
    def missing(spec) -> str | None:
        """Why a grid cannot be drawn here: the encoder folder the prompts need is absent."""
        if not Path(spec.text.encoder).is_dir():
            return f"text encoder {spec.text.encoder} not found"
        return None
