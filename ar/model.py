"""The generator: condition prefix + generation order + transformer backbone + prediction head.

    codes (B, h, w) --order--> sequence (B, N) --embed--> [cond prefix (B, P, D); tokens]
        --transformer (causal)--> hidden (B, N, D) --head--> loss | next token

`ARModel.forward` is the training path. Inference is split into `prefill` and `decode_step`,
which write the static KV cache set up by `setup_cache`; the free functions in
`sampling/generate.py` drive them. Cached decoding equals a full forward pass (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from ar.conditioning import LabelEmbedder
from ar.heads import HEADS
from ar.orders import ORDERS
from ar.transformer import Transformer, TransformerArgs, find_multiple, rope_2d
from common.config import ConfigError, check_fields

##################################################################################
#                                  Configs                                       #
##################################################################################


@dataclass
class ModelConfig:
    size: str = "debug"  # a name in AR_SIZES: debug, AR-Nano, AR-B, AR-L, AR-XL, AR-XXL, AR-3B
    dim: Optional[int] = None  # override the size's width
    n_layer: Optional[int] = None  # override the size's depth
    n_head: Optional[int] = None  # override the size's number of attention heads
    n_kv_head: Optional[int] = None  # key/value heads for grouped-query attention (None: = n_head)
    head: str = "token"  # prediction head, a name in ar.heads.HEADS
    order: str = "raster"  # generation order, a name in ar.orders.ORDERS
    cond_tokens: int = 1  # number of prefix tokens the class condition occupies
    rope_base: float = 10000.0  # rotary embedding base
    cond_rope: str = "zero"  # rotation at condition positions: zero (LlamaGen: q/k zeroed) | identity
    pos_embed: str = "none"  # absolute position embedding added to the inputs: none (LlamaGen) | learned
    cond_add: bool = False  # also add a class embedding to every token input (not in LlamaGen; a
    #                         stronger class signal for small models, see README "Model options")
    token_dropout: float = 0.1  # dropout on the input embeddings (LlamaGen: 0.1)
    resid_dropout: float = 0.1  # dropout on each residual branch (LlamaGen: 0.1)
    ffn_dropout: float = 0.1  # dropout inside the feed-forward (LlamaGen: 0.1)

    def validate(self) -> None:
        if self.size not in AR_SIZES:
            raise ConfigError(f"model.size={self.size!r} is not a known size; choose one of "
                              f"{sorted(AR_SIZES)} (or set model.dim/n_layer/n_head)")
        if self.head not in HEADS:
            raise ConfigError(f"model.head={self.head!r}; choose one of {sorted(HEADS)}")
        if self.order not in ORDERS:
            raise ConfigError(f"model.order={self.order!r}; choose one of {sorted(ORDERS)}")
        if self.cond_rope not in ("zero", "identity"):
            raise ConfigError(f"model.cond_rope={self.cond_rope!r}; choose zero or identity")
        if self.pos_embed not in ("none", "learned"):
            raise ConfigError(f"model.pos_embed={self.pos_embed!r}; choose none or learned")
        check_fields(self, "model.", {"dim": ">= 1", "n_layer": ">= 1", "n_head": ">= 1",
                                      "n_kv_head": ">= 1", "cond_tokens": ">= 1", "rope_base": "> 0",
                                      "token_dropout": "[0, 1)", "resid_dropout": "[0, 1)",
                                      "ffn_dropout": "[0, 1)"})
        a = transformer_args(self)
        if a.dim % a.n_head or a.n_head % a.n_kv_head or a.head_dim % 4:
            raise ConfigError(f"model: dim {a.dim} must split into {a.n_head} heads of a width "
                              f"divisible by 4, and n_head must be a multiple of n_kv_head "
                              f"({a.n_kv_head})")


@dataclass
class GeneratorSpec:
    """Everything that fixes the generator's architecture: the model config plus values
    derived once from the code cache. Stored in every weights file."""

    model: ModelConfig = field(default_factory=ModelConfig)  # architecture choices
    vocab_size: int = 0  # codebook size of the tokenizer
    grid_h: int = 0  # code-grid rows
    grid_w: int = 0  # code-grid columns
    num_classes: int = 0  # number of real classes (the null class is extra)
    class_names: List[str] = field(default_factory=list)  # class names, by label
    resolution: int = 0  # image side in pixels
    tokenizer_path: str = ""  # tokenizer weights used to make the codes
    tokenizer_sha256: str = ""  # their sha256, checked when sampling


##################################################################################
#                                   Model                                        #
##################################################################################


class ARModel(nn.Module):
    def __init__(self, spec: GeneratorSpec):
        super().__init__()
        self.spec = spec
        m = spec.model
        a = transformer_args(m)
        self.prefix = m.cond_tokens
        self.order = ORDERS[m.order](spec.grid_h, spec.grid_w)
        self.num_tokens = self.order.num_tokens
        self.cond = LabelEmbedder(spec.num_classes, a.dim, m.cond_tokens)
        self.tok_embeddings = nn.Embedding(spec.vocab_size, a.dim)
        # (num_classes + 1, D): the label's embedding added to every token input, null row included
        self.cond_add = nn.Embedding(spec.num_classes + 1, a.dim) if m.cond_add else None
        self._cond_bias = None  # (B, 1, D) set by prefill for the decode steps that follow
        self.pos_embed = (nn.Parameter(torch.zeros(self.prefix + self.num_tokens, a.dim))
                          if m.pos_embed == "learned" else None)  # (P + N, D), by sequence position
        self.token_dropout = nn.Dropout(m.token_dropout)
        self.transformer = Transformer(a)
        self.head = HEADS[m.head](a.dim, spec.vocab_size)
        self.register_buffer("rope", self._rope_table(), persistent=False)
        self.initialize_weights()

    def _rope_table(self) -> torch.Tensor:
        """(P + N, Dh/2, 2): condition positions first, then the sequence's grid positions."""
        rows, cols = self.order.coords()
        table = rope_2d(rows, cols, self.transformer.args.head_dim, self.spec.model.rope_base)
        cond = torch.zeros(self.prefix, *table.shape[1:], device=table.device)
        if self.spec.model.cond_rope == "identity":
            cond[..., 0] = 1.0  # cos 1, sin 0: no rotation
        return torch.cat([cond, table])

    def reset_buffers(self, device: torch.device | str) -> None:
        """Recompute non-persistent buffers, e.g. after building on the meta device."""
        self.rope = self._rope_table().to(device)

    def initialize_weights(self) -> None:
        # LlamaGen/GPT-2 style: N(0, 0.02) for every matrix and table ...
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=0.02)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
        # ... and a zero output layer, so training starts from uniform predictions
        nn.init.zeros_(self.head.output.weight)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)

    def _label_bias(self, labels: torch.Tensor) -> torch.Tensor | None:
        """(B, 1, D): what model.cond_add adds to every token input; None when it is off."""
        return None if self.cond_add is None else self.cond_add(labels)[:, None]

    def _embed(self, tokens: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Token inputs (B, n) -> (B, n, D), with the label bias when there is one."""
        x = self.tok_embeddings(tokens)
        return x if bias is None else x + bias

    def _with_pos(self, x: torch.Tensor, pos: torch.Tensor | slice) -> torch.Tensor:
        return x if self.pos_embed is None else x + self.pos_embed[pos].to(x.dtype)

    # ------------------------------------------------------------------ training

    def forward(self, codes: torch.Tensor, labels: torch.Tensor) -> dict:
        """codes (B, h, w) or (B, N); labels (B,) with the null id for dropped conditions."""
        seq = self.order.to_sequence(codes)  # (B, N)
        h = self.hidden(seq[:, :-1], labels)  # (B, N, D)
        loss, metrics = self.head.loss(h, seq)
        return {"loss": loss, **metrics}

    def hidden(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Teacher-forced hidden states: inputs (B, n) are sequence tokens 0..n-1; returns
        (B, n + 1, D), where row i predicts sequence token i."""
        tokens = self._embed(inputs, self._label_bias(labels))  # (B, n, D)
        x = torch.cat([self.cond(labels), tokens], dim=1)  # (B, P + n, D)
        x = self.token_dropout(self._with_pos(x, slice(0, x.shape[1])))
        h = self.transformer(x, self.rope[: x.shape[1]])  # (B, P + n, D)
        return h[:, self.prefix - 1:]

    # ----------------------------------------------------------------- inference

    def setup_cache(self, batch: int, dtype: torch.dtype | None = None) -> None:
        capacity = self.prefix + self.num_tokens
        dtype = dtype or self.tok_embeddings.weight.dtype
        self.transformer.setup_cache(batch, capacity, dtype, self.rope.device)

    def clear_cache(self) -> None:
        self.transformer.clear_cache()
        self._cond_bias = None

    def _cached(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Run x (B, T, D) at sequence positions pos (T,) against the KV cache."""
        capacity = self.prefix + self.num_tokens
        keys = torch.arange(capacity, device=pos.device)
        mask = keys[None, :] <= pos[:, None]  # (T, L): attend to everything written so far
        return self.transformer(x, self.rope[pos], mask, pos)

    def prefill(self, labels: torch.Tensor) -> torch.Tensor:
        """Write the condition prefix into the cache; return the hidden state (B, D) that
        predicts the first token."""
        pos = torch.arange(self.prefix, device=labels.device)
        self._cond_bias = self._label_bias(labels)
        return self._cached(self._with_pos(self.cond(labels), pos), pos)[:, -1]

    def decode_step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Feed tokens (B,) at sequence position pos (a 1-element tensor, kept on the device
        so the loop never syncs); return the hidden state (B, D) predicting the next one."""
        x = self._with_pos(self._embed(tokens[:, None], self._cond_bias), pos)  # (B, 1, D)
        return self._cached(x, pos)[:, 0]


##################################################################################
#                                Size registry                                   #
##################################################################################


def transformer_args(m: ModelConfig) -> TransformerArgs:
    base = AR_SIZES.get(m.size, AR_SIZES["debug"])
    dim = m.dim or base["dim"]
    n_head = m.n_head or base["n_head"]
    return TransformerArgs(
        dim=dim,
        n_layer=m.n_layer or base["n_layer"],
        n_head=n_head,
        n_kv_head=m.n_kv_head or n_head,
        # SwiGLU with 2/3 of 4*dim, rounded up to a multiple of 256 (LlamaGen / LLaMA)
        ffn_hidden=find_multiple(int(2 * 4 * dim / 3), 256),
        resid_dropout=m.resid_dropout,
        ffn_dropout=m.ffn_dropout,
    )


# LlamaGen's GPT shapes; parameter counts for the c2i ImageNet setting (16384 codes, 1000 classes)
AR_SIZES: dict[str, dict[str, int]] = {
    "debug": dict(dim=64, n_layer=2, n_head=4),  # tests: seconds on a CPU
    "AR-Nano": dict(dim=256, n_layer=6, n_head=8),  # quickstart: minutes on a laptop CPU
    "AR-B": dict(dim=768, n_layer=12, n_head=12),  # 111M
    "AR-L": dict(dim=1024, n_layer=24, n_head=16),  # 343M
    "AR-XL": dict(dim=1280, n_layer=36, n_head=20),  # 775M
    "AR-XXL": dict(dim=1536, n_layer=48, n_head=24),  # 1.4B
    "AR-3B": dict(dim=3200, n_layer=24, n_head=32),  # 3.1B
}
