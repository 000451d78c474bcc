"""The generator: condition + order + inputs + transformer backbone + head.

    codes (B, h, w) --order--> sequence (B, N) --inputs--> [condition prefix (B, P, D); inputs]
        --transformer (block-causal mask)--> hidden states predicting each element --head-->
        loss | one step's tokens

`ARModel.forward` is the training path. Inference: `prefill(condition)` writes the prefix into
the static KV cache set up by `setup_cache`, then `extend(x, positions)` feeds T inputs at T
positions against it; the cache is the model's only mutable inference state. The free
functions in `sampling/generate.py` drive them step by step. Cached decoding equals a full
forward pass for every order (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import nn

from ar.conditioning import ClassCondition, LabelEmbedder
from ar.heads import HEADS, TokenHeadConfig
from ar.inputs import INPUTS
from ar.orders import ORDERS, make_order
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
    token_head: TokenHeadConfig = field(default_factory=TokenHeadConfig)  # the token head's options
    order: str = "raster"  # generation order: raster | cell (model.cell) | subsample (model.subsample) | whole
    cell: int = 2  # order=cell: k x k tokens per step (k divides both grid sides)
    subsample: int = 2  # order=subsample: s x s steps, each the sub-grid of one offset
    inputs: str = "auto"  # next_token | next_group | auto (next_token for raster, else next_group)
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
        check_fields(self, "model.", {"inputs": ("auto", *INPUTS), "cell": ">= 1", "subsample": ">= 1",
                                      "dim": ">= 1", "n_layer": ">= 1", "n_head": ">= 1",
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
        self.order = make_order(m.order, spec.grid_h, spec.grid_w, m.cell, m.subsample)
        self.num_tokens = self.order.num_tokens
        self.cond = LabelEmbedder(spec.num_classes, a.dim, m.cond_tokens)
        self.tok_embeddings = nn.Embedding(spec.vocab_size, a.dim)
        # (num_classes + 1, D): the label's embedding added to every input, null row included
        self.cond_add = nn.Embedding(spec.num_classes + 1, a.dim) if m.cond_add else None
        self.pos_embed = (nn.Parameter(torch.zeros(self.prefix + self.num_tokens, a.dim))
                          if m.pos_embed == "learned" else None)  # (P + N, D), by sequence position
        self.token_dropout = nn.Dropout(m.token_dropout)
        self.inputs = INPUTS[input_kind(m)](self.order, self.prefix, a.dim)
        self.length = self.prefix + self.inputs.length  # sequence positions, prefix included
        self.transformer = Transformer(a)
        head, config_field = HEADS[m.head]
        self.head = head(a.dim, spec.vocab_size, getattr(m, config_field))
        self.register_buffer("rope", self._rope_table(), persistent=False)
        self.initialize_weights()

    def _rope_table(self) -> torch.Tensor:
        """(P + N, Dh/2, 2): condition positions first, then the sequence's grid positions
        (position P + i holds element i's input, or token i for next-token)."""
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
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.02)
        if hasattr(self.inputs, "initialize"):
            self.inputs.initialize()
        self.head.initialize()  # ... and the head its own output layer (zero: uniform predictions)

    @property
    def dtype(self) -> torch.dtype:
        return self.tok_embeddings.weight.dtype

    def condition(self, cond: ClassCondition) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prefix embeddings (B, P, D), the vector added to every input (B, 1, D) or None)."""
        vector = None if self.cond_add is None else self.cond_add(cond.labels)[:, None]
        return self.cond(cond), vector

    def embed_tokens(self, tokens: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
        """Token inputs (B, n) -> (B, n, D), plus the condition's vector when there is one."""
        x = self.tok_embeddings(tokens)
        return x if vector is None else x + vector

    def _with_pos(self, x: torch.Tensor, pos: torch.Tensor | slice) -> torch.Tensor:
        return x if self.pos_embed is None else x + self.pos_embed[pos].to(x.dtype)

    def attention_mask(self, query_positions: torch.Tensor | None = None) -> torch.Tensor | None:
        """The block rule as a boolean "may attend" mask (T, L) for queries at the given
        positions (all L when None); None where it is plain causal attention (SDPA's fast path)."""
        blocks = self.inputs.blocks  # (L,)
        if query_positions is None:
            return None if self.inputs.causal else blocks[None, :] <= blocks[:, None]
        return blocks[None, :] <= blocks[query_positions][:, None]

    # ------------------------------------------------------------------ training

    def forward(self, codes: torch.Tensor, cond: ClassCondition) -> dict:
        """codes (B, h, w) or (B, N); cond with the null id for dropped conditions."""
        seq = self.order.to_sequence(codes)  # (B, N)
        loss, metrics = self.head.loss(self.hidden(seq, cond), seq)
        return {"loss": loss, **metrics}

    def hidden(self, seq: torch.Tensor, cond: ClassCondition) -> torch.Tensor:
        """Teacher-forced hidden states (B, N, D): row i predicts sequence element i."""
        prefix, vector = self.condition(cond)
        x = torch.cat([prefix, self.inputs.teacher_forced(self, seq, vector)], dim=1)  # (B, L, D)
        x = self.token_dropout(self._with_pos(x, slice(0, x.shape[1])))
        h = self.transformer(x, self.rope[: x.shape[1]], self.attention_mask())  # (B, L, D)
        return h[:, self.inputs.out_positions]

    # ----------------------------------------------------------------- inference

    def setup_cache(self, batch: int, dtype: torch.dtype | None = None) -> None:
        self.transformer.setup_cache(batch, self.length, dtype or self.dtype, self.rope.device)

    def clear_cache(self) -> None:
        self.transformer.clear_cache()

    def extend(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed inputs x (B, T, D) at sequence positions (T,) against the KV cache; returns
        their hidden states (B, T, D). Positions stay on the device: no host sync."""
        x = self._with_pos(x, positions)
        return self.transformer(x, self.rope[positions], self.attention_mask(positions), positions)

    def prefill(self, cond: ClassCondition) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write the condition prefix into the cache; returns its hidden states (B, P, D) and
        the condition's vector for the inputs that follow (None without model.cond_add)."""
        prefix, vector = self.condition(cond)
        return self.extend(prefix, torch.arange(self.prefix, device=prefix.device)), vector


def input_kind(m: ModelConfig) -> str:
    if m.inputs != "auto":
        return m.inputs
    return "next_token" if m.order == "raster" else "next_group"


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
