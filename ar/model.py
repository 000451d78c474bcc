"""The generator: condition + order + inputs + transformer backbone + head.

    codes (B, h, w) --order--> sequence (B, N) --inputs--> [condition prefix (B, P, D); inputs]
        --transformer (block-causal mask)--> hidden states predicting each element --head-->
        loss | one step's tokens

`ARModel.forward` is the training path: the head says what the model is fed and must predict
(`head.training_pair`: the codes themselves, or noisy latents and their velocity for flow).
Inference: `prefill(condition)` writes the prefix into the static KV cache set up by
`setup_cache`, then `extend(x, positions, ada)` feeds T inputs at T positions against it; the
cache is the model's only mutable inference state. The free functions in `sampling/generate.py`
and `sampling/flow.py` drive them step by step. Cached decoding equals a full forward pass for
every order (tested).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import List, Optional

import torch
from torch import nn

from ar.conditioning import ClassCondition, LabelEmbedder, TextCondition, TextEmbedder
from ar.heads import HEADS, FlowHeadConfig, TokenHeadConfig
from ar.inputs import INPUTS
from ar.orders import CPU, ORDERS, make_order
from ar.transformer import Transformer, TransformerArgs, find_multiple, rope_2d
from common.config import ConfigError, check_fields

Condition = ClassCondition | TextCondition

##################################################################################
#                                  Configs                                       #
##################################################################################


@dataclass
class BackboneConfig:
    """The block's switches (ar/transformer.py); the defaults are LlamaGen's block."""

    norm_eps: float = 1e-5  # norm epsilon (xAR, VAR: 1e-6)
    block_norm: str = "rms"  # the blocks' norm: rms | layer (VAR)
    block_norm_affine: bool = True  # a learned weight in the blocks' norms (xAR, VAR: false)
    ffn: str = "gated"  # feed-forward: gated (w2(act(w1 x) * w3 x)) | mlp (w2(act(w1 x)), VAR)
    ffn_gate: str = "silu"  # its activation: silu (SwiGLU) | gelu (xAR) | gelu_tanh (VAR)
    ffn_hidden: Optional[int] = None  # feed-forward width; None: 8/3 dim rounded up to 256 (LlamaGen)
    bias: bool = False  # biases on qkv, attention output and feed-forward (xAR, VAR: true)
    k_bias: bool = True  # with bias: on the keys too (VAR: false, q and v only)
    qk_norm: bool = False  # l2-normalised q, k with a learned per-head scale clamped at 100 (VAR)
    final_adaln: bool = False  # the final norm modulated by (scale, shift) from the adaLN vector (VAR)
    adaln: bool = False  # six-way adaLN from a class vector (+ the step's timestep for flow)
    input_norm: bool = False  # RMSNorm with weight on the inputs (xAR's z_proj_ln)
    split: int = 0  # blocks in the first of two halves joined by norm + Linear + position table (xAR: depth / 2)
    attn_dropout: float = 0.0  # dropout on attention probabilities (xAR trains with 0.1)
    drop_path: float = 0.0  # stochastic depth, rising linearly over the blocks to this rate (VAR: 0.1 depth / 24)

    def validate(self) -> None:
        check_fields(self, "model.backbone.", {"norm_eps": "> 0", "block_norm": ("rms", "layer"),
                                               "ffn": ("gated", "mlp"),
                                               "ffn_gate": ("silu", "gelu", "gelu_tanh"),
                                               "ffn_hidden": ">= 1", "split": ">= 0",
                                               "attn_dropout": "[0, 1)", "drop_path": "[0, 1)"})
        if self.final_adaln and not self.adaln:
            raise ConfigError("model.backbone.final_adaln=true needs model.backbone.adaln=true "
                              "(the final norm is modulated by the same vector)")


@dataclass
class ModelConfig:
    size: str = "debug"  # a name in AR_SIZES: debug, AR-Nano, AR-B, AR-L, AR-XL, AR-XXL, AR-3B, xAR-B, xAR-L, xAR-H, VAR-d16, VAR-d20, VAR-d24, VAR-d30
    dim: Optional[int] = None  # override the size's width
    n_layer: Optional[int] = None  # override the size's depth
    n_head: Optional[int] = None  # override the size's number of attention heads
    n_kv_head: Optional[int] = None  # key/value heads for grouped-query attention (None: = n_head)
    head: str = "token"  # prediction head, a name in ar.heads.HEADS: token (discrete codes) | flow (latents)
    token_head: TokenHeadConfig = field(default_factory=TokenHeadConfig)  # the token head's options
    flow_head: FlowHeadConfig = field(default_factory=FlowHeadConfig)  # the flow head's options
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # the block's switches
    order: str = "raster"  # generation order: raster | cell (model.cell) | subsample (model.subsample) | whole | scale (the multi-scale tokenizer's schedule, VAR)
    cell: int = 2  # order=cell: k x k tokens per step (k divides both grid sides)
    subsample: int = 2  # order=subsample: s x s steps, each the sub-grid of one offset
    inputs: str = "auto"  # next_token | next_group | flow | next_scale | shuffle (Token-Shuffle: a step's tokens fused into one position; order=cell with cell=s fuses s x s) | auto (flow for the flow head; next_scale for order=scale; else next_token for raster, next_group otherwise)
    shuffle_blocks: int = 2  # inputs=shuffle: residual MLP blocks after fusing and before unshuffling (Token-Shuffle's n)
    cond_tokens: int = 1  # prefix tokens the class condition occupies (0: none; the class enters by adaLN; next_scale: the first scale's tokens)
    cond_prefix: str = "table"  # the prefix's embedding: table (its own, LlamaGen) | vector (the adaLN class vector repeated, VAR's start token)
    rope: str = "2d"  # rotary position embedding: 2d (LlamaGen's layout) | none (VAR: learned positions only)
    rope_base: float = 10000.0  # rotary embedding base
    cond_rope: str = "zero"  # rotation at condition positions: zero (LlamaGen: q/k zeroed) | identity
    pos_embed: str = "none"  # absolute position embedding added to the inputs: none (LlamaGen) | learned
    level_embed: bool = False  # a learned embedding per step added at the positions predicting it (VAR's lvl_embed)
    cond_add: bool = False  # also add a class embedding (text: the pooled caption) to every token input
    #                         (not in LlamaGen; a stronger condition signal for small models, README "Model options")
    condition: str = "class"  # class (labels) | text (captions: the cache's caption tokens or encoder features, `tokenizer.encode text.kind=...`; the prefix is the caption's T positions)
    text_loss: float = 0.0  # condition=text with caption tokens: weight of a loss on the caption's own tokens (0: image tokens only)
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
        check_fields(self, "model.", {"condition": ("class", "text"), "text_loss": ">= 0",
                                      "cond_rope": ("zero", "identity"), "pos_embed": ("none", "learned"),
                                      "rope": ("2d", "none"), "cond_prefix": ("table", "vector"),
                                      "inputs": ("auto", *INPUTS), "cell": ">= 1", "subsample": ">= 1",
                                      "dim": ">= 1", "n_layer": ">= 1", "n_head": ">= 1",
                                      "n_kv_head": ">= 1", "cond_tokens": ">= 0", "rope_base": "> 0",
                                      "shuffle_blocks": ">= 0",
                                      "token_dropout": "[0, 1)", "resid_dropout": "[0, 1)",
                                      "ffn_dropout": "[0, 1)"})
        self.backbone.validate()
        kind = input_kind(self)
        if (self.head == "flow") != (kind == "flow"):
            raise ConfigError(f"model.head={self.head} with model.inputs={kind}: the flow head "
                              f"needs model.inputs=flow (or auto), and flow inputs the flow head")
        if (self.order == "scale") != (kind == "next_scale"):
            raise ConfigError(f"model.order={self.order} with model.inputs={kind}: next-scale "
                              f"inputs go with the scale order and the scale order with them")
        if kind == "next_scale" and self.head != "token":
            raise ConfigError("model.order=scale predicts a multi-scale tokenizer's codes: it "
                              "needs model.head=token")
        if self.condition == "text":
            self._validate_text()
        elif self.text_loss:
            raise ConfigError("model.text_loss needs model.condition=text (a caption to predict)")
        if self.cond_tokens == 0 and not self.backbone.adaln and self.condition == "class":
            raise ConfigError("model.cond_tokens=0 leaves the class no way in: set "
                              "model.backbone.adaln=true, or cond_tokens >= 1")
        if self.cond_prefix == "vector" and not self.backbone.adaln:
            raise ConfigError("model.cond_prefix=vector repeats the adaLN class vector: it needs "
                              "model.backbone.adaln=true")
        if self.cond_tokens == 0 and kind == "next_token" and self.condition == "class":
            raise ConfigError("model.inputs=next_token predicts token 0 from the last prefix "
                              "position: it needs model.cond_tokens >= 1")
        self._validate_shape()

    def _validate_text(self) -> None:
        """A caption enters as prefix tokens (and, with cond_add, pooled into every input):
        there is no class vector to drive adaLN."""
        for name, on in (("model.backbone.adaln", self.backbone.adaln),
                         ("model.cond_prefix=vector", self.cond_prefix == "vector")):
            if on:
                raise ConfigError(f"{name} needs a class vector; model.condition=text conditions "
                                  f"on the caption's prefix tokens only: turn it off")

    def _validate_shape(self) -> None:
        a = transformer_args(self)
        if a.split >= a.n_layer:
            raise ConfigError(f"model.backbone.split={a.split} must be below the number of "
                              f"layers ({a.n_layer})")
        if a.dim % a.n_head or a.n_head % a.n_kv_head or a.head_dim % 4:
            raise ConfigError(f"model: dim {a.dim} must split into {a.n_head} heads of a width "
                              f"divisible by 4, and n_head must be a multiple of n_kv_head "
                              f"({a.n_kv_head})")


@dataclass
class MultiScaleSpec:
    """A multi-scale tokenizer's quantiser (VAR's VQVAE), which next-scale inputs rebuild from
    codes; copied from the tokenizer's config. Empty for single-grid tokenizers."""

    patch_nums: List[int] = field(default_factory=list)  # side of each scale's code map, coarse to fine (last = grid side)
    code_dim: int = 0  # channels of a code vector (VAR's Cvae)
    quant_resi: float = 0.5  # r of the tokenizer's phi(x) = (1 - r) x + r conv3x3(x)
    share_quant_resi: int = 4  # the tokenizer's phi convolutions: 1 shared, 0 one per scale, K spread


@dataclass
class TextSpec:
    """The caption side of a text-to-image generator, copied from the cache's text/meta.json.
    Empty (kind "") for class-conditional models."""

    kind: str = ""  # tokens (caption tokens in the sequence) | features (a frozen encoder's) | "" (no text)
    max_tokens: int = 0  # caption positions T before the image (captions left-padded)
    tokenizer: str = ""  # tokens: byte | bpe
    tokenizer_json: str = ""  # tokens, bpe: the trained caption tokenizer, so sampling needs no other file
    vocab_size: int = 0  # tokens: caption vocabulary, padding id 0 included
    channels: int = 0  # features: the encoder's width C
    encoder: str = ""  # features: the encoder folder the cache was made with (prompts are encoded with it)
    encoder_sha256: str = ""  # features: its weights' sha256, checked when sampling


@dataclass
class GeneratorSpec:
    """Everything that fixes the generator's architecture: the model config plus values
    derived once from the code cache. Stored in every weights file."""

    model: ModelConfig = field(default_factory=ModelConfig)  # architecture choices
    vocab_size: int = 0  # codebook size of the tokenizer (discrete)
    latent_channels: int = 0  # channels per latent position (continuous tokenizers)
    multiscale: MultiScaleSpec = field(default_factory=MultiScaleSpec)  # the scale schedule and quantiser (multi-scale tokenizers)
    grid_h: int = 0  # code-grid rows
    grid_w: int = 0  # code-grid columns
    num_classes: int = 0  # number of real classes (the null class is extra)
    class_names: List[str] = field(default_factory=list)  # class names, by label
    text: TextSpec = field(default_factory=TextSpec)  # text-to-image: the caption side
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
        head, config_field = HEADS[m.head]
        text = m.condition == "text"
        if text and not spec.text.kind:
            raise ValueError("model.condition=text, but the spec has no caption side (spec.text); "
                             "train on a cache encoded with text.kind=...")
        self.prefix = spec.text.max_tokens if text else m.cond_tokens
        self.order = make_order(m.order, spec.grid_h, spec.grid_w, m.cell, m.subsample,
                                spec.multiscale.patch_nums)
        self.num_tokens = self.order.num_tokens
        a = transformer_args(m)
        self.cond = TextEmbedder(spec.text, a.dim, m.text_loss, pooled=m.cond_add) if text else \
            LabelEmbedder(spec.num_classes, a.dim, m.cond_tokens, vector=a.adaln,
                          tied=m.cond_prefix == "vector")
        inputs = INPUTS[input_kind(m)]
        # token inputs are codebook embeddings; flow and next-scale inputs project their own
        self.tok_embeddings = (nn.Embedding(spec.vocab_size, a.dim)
                               if inputs.tokenizer_kind == "discrete" else None)
        # (num_classes + 1, D): the label's embedding added to every input, null row included
        self.cond_add = nn.Embedding(spec.num_classes + 1, a.dim) if m.cond_add and not text else None
        inputs = inputs(self.order, self.prefix, a.dim, spec)
        self.length = self.prefix + inputs.length  # sequence positions L, prefix included
        self.pos_embed = (nn.Parameter(torch.zeros(self.length, a.dim))
                          if m.pos_embed == "learned" else None)  # (L, D), by sequence position
        self.token_dropout = nn.Dropout(m.token_dropout)
        self.inputs = inputs
        self.level_embed = nn.Embedding(self.order.num_steps, a.dim) if m.level_embed else None
        self.register_buffer("levels", self._levels(), persistent=False)
        self.transformer = Transformer(replace(a, capacity=self.length))
        outputs = spec.latent_channels if head.continuous else spec.vocab_size
        self.head = head(a.dim, outputs, getattr(m, config_field))
        self.register_buffer("rope", self._rope_table(), persistent=False)
        self.initialize_weights()

    def _rope_table(self) -> torch.Tensor | None:
        """(P + N, Dh/2, 2): condition positions first, then the sequence's grid positions
        (position P + i holds element i's input, or token i for next-token); None without RoPE."""
        if self.spec.model.rope == "none":
            return None
        rows, cols = self.inputs.coords()
        table = rope_2d(rows, cols, self.transformer.args.head_dim, self.spec.model.rope_base)
        cond = torch.zeros(self.prefix, *table.shape[1:], device=table.device)
        if self.spec.model.cond_rope == "identity":
            cond[..., 0] = 1.0  # cos 1, sin 0: no rotation
        return torch.cat([cond, table])

    def _levels(self) -> torch.Tensor:
        """(P + N,): the step each position predicts (0 where it predicts nothing), which picks
        its level embedding."""
        levels = torch.zeros(self.length, dtype=torch.long, device=CPU)
        levels[self.inputs.out_positions.cpu()] = self.order.step_of
        return levels

    def reset_buffers(self, device: torch.device | str) -> None:
        """Recompute non-persistent buffers, e.g. after building on the meta device."""
        rope = self._rope_table()
        self.rope = None if rope is None else rope.to(device)
        self.levels = self._levels().to(device)

    def initialize_weights(self) -> None:
        # LlamaGen/GPT-2 style: N(0, 0.02) for every matrix and table ...
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, std=0.02)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
        for table in (self.pos_embed, getattr(self.transformer, "mid_pos", None)):
            if table is not None:
                nn.init.normal_(table, std=0.02)
        modulations = [layer.modulation for layer in self.transformer.layers]
        for mod in modulations + [self.transformer.final_modulation]:
            if mod is not None:  # adaLN-zero (DiT): blocks start as identity, the final norm plain
                nn.init.zeros_(mod[-1].weight)
                nn.init.zeros_(mod[-1].bias)
        for part in (self.inputs, self.cond):
            if hasattr(part, "initialize"):
                part.initialize()
        self.head.initialize()  # ... and the head its own output layer (zero: uniform predictions)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.layers[0].attention.wqkv.weight.dtype

    def condition(self, cond: Condition) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prefix embeddings (B, P, D), the vector added to every input (B, 1, D) or None)."""
        if self.cond_add is not None:
            vector = self.cond_add(cond.labels)[:, None]
        else:  # a text model with cond_add: the pooled caption; otherwise None
            vector = self.cond.input_vector(cond)
        return self.cond(cond), vector

    def embed_tokens(self, tokens: torch.Tensor, vector: torch.Tensor | None) -> torch.Tensor:
        """Token inputs (B, n) -> (B, n, D), plus the condition's vector when there is one."""
        x = self.tok_embeddings(tokens)
        return x if vector is None else x + vector

    def _with_pos(self, x: torch.Tensor, pos: torch.Tensor | slice) -> torch.Tensor:
        """Inputs plus the learned position and level embeddings of their positions."""
        if self.pos_embed is not None:
            x = x + self.pos_embed[pos].to(x.dtype)
        if self.level_embed is not None:
            x = x + self.level_embed(self.levels[pos]).to(x.dtype)
        return x

    def _rope_at(self, pos: torch.Tensor | slice) -> torch.Tensor | None:
        return None if self.rope is None else self.rope[pos]

    def attention_mask(self, query_positions: torch.Tensor | None = None) -> torch.Tensor | None:
        """The block rule as a boolean "may attend" mask (T, L) for queries at the given
        positions (T,), or (B, T, L) for per-row positions (B, T), (all L when None); None where
        it is plain causal attention (SDPA's fast path)."""
        blocks = self.inputs.blocks  # (L,)
        if query_positions is None:
            return None if self.inputs.causal else blocks[None, :] <= blocks[:, None]
        return blocks <= blocks[query_positions][..., None]

    # ------------------------------------------------------------------ training

    def forward(self, data: torch.Tensor, cond: Condition, draws=None) -> dict:
        """data: codes (B, h, w) or (B, N), or latents (B, C, h, w); cond with the null for
        dropped conditions; draws: the flow head's (t, eps) instead of random ones (tests)."""
        seq = self.order.to_sequence(data)  # (B, N) codes or (B, N, C) latents
        inputs, target, t = self.head.training_pair(seq, self.order.step_of, draws)
        h = self.states(inputs, cond, t)  # (B, L, D)
        loss, metrics = self.head.loss(self.inputs.predictions(h), target)
        if self.cond.loss_weight:  # unified text sequences: the caption's own tokens
            text_loss = self.cond.loss(h[:, :self.prefix], cond)
            loss, metrics = loss + self.cond.loss_weight * text_loss, {**metrics, "text_loss": text_loss.detach()}
        return {"loss": loss, **metrics}

    def hidden(self, seq: torch.Tensor, cond: Condition,
               t: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced hidden states (B, N, D): row i predicts sequence element i; t (B, S)
        is each step's flow time (flow inputs)."""
        return self.inputs.predictions(self.states(seq, cond, t))

    def states(self, seq: torch.Tensor, cond: Condition, t: torch.Tensor | None = None) -> torch.Tensor:
        """The transformer's output at every position (B, L, D), prefix included."""
        prefix, vector = self.condition(cond)
        x = torch.cat([prefix, self.inputs.teacher_forced(self, seq, vector)], dim=1)  # (B, L, D)
        x = self.token_dropout(self._with_pos(x, slice(0, x.shape[1])))
        return self.transformer(x, self._rope_at(slice(0, x.shape[1])), self.attention_mask(),
                                ada=self.modulation(cond, t))  # (B, L, D)

    def modulation(self, cond: Condition, t: torch.Tensor | None = None):
        """adaLN input for a whole sequence: None without adaLN; the class vector for every
        position; with flow times t (B, S), one vector per step, the prefix getting t = 0."""
        if t is None:
            vectors = self.ada_vectors(cond)
            return None if vectors is None else (vectors, None)
        t = torch.cat([t.new_zeros(t.shape[0], 1), t], dim=1)  # (B, 1 + S): row 0 the prefix's
        return self.ada_vectors(cond, t), self.inputs.blocks + 1

    def ada_vectors(self, cond: Condition, t: torch.Tensor | None = None):
        """The distinct adaLN vectors of positions fed together: (B, 1, D) from the class, or
        (B, S', D) with flow times t (B, S'); None without adaLN."""
        if self.cond.vector_table is None:
            return None
        vector = self.cond.vector(cond)  # (B, 1, D)
        return vector if t is None else self.inputs.time_vectors(vector, t)

    # ----------------------------------------------------------------- inference

    def setup_cache(self, batch: int, dtype: torch.dtype | None = None) -> None:
        self.transformer.setup_cache(batch, self.length, dtype or self.dtype, self.levels.device)

    def clear_cache(self) -> None:
        self.transformer.clear_cache()

    def extend(self, x: torch.Tensor, positions: torch.Tensor, ada=None) -> torch.Tensor:
        """Feed inputs x (B, T, D) at sequence positions (T,), or (B, T) when rows are at
        different positions, against the KV cache; returns their hidden states (B, T, D).
        Positions stay on the device: no host sync. ada: the adaLN input (vectors (B, S, D),
        index (T,) | None) of adaLN models."""
        x = self._with_pos(x, positions)
        return self.transformer(x, self._rope_at(positions), self.attention_mask(positions),
                                positions, ada)

    def prefill(self, cond: Condition) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Write the condition prefix into the cache; returns its hidden states (B, P, D) and
        the condition's vector for the inputs that follow (None without model.cond_add)."""
        prefix, vector = self.condition(cond)
        if self.prefix == 0:
            return prefix, vector
        # flow models see the prefix as clean context (t = 0), as in training
        t = prefix.new_zeros(len(cond), 1) if self.inputs.timed else None
        vectors = self.ada_vectors(cond, t)
        ada = None if vectors is None else (vectors, None)
        return self.extend(prefix, torch.arange(self.prefix, device=prefix.device), ada), vector


def tokenizer_kind(m: ModelConfig) -> str:
    """The kind of tokenizer, and of code cache, the model is trained on: discrete (one code
    grid), multiscale (every scale's codes) or continuous (latents)."""
    return INPUTS[input_kind(m)].tokenizer_kind


def input_kind(m: ModelConfig) -> str:
    if m.inputs != "auto":
        return m.inputs
    if m.head == "flow":
        return "flow"
    if m.order == "scale":
        return "next_scale"
    return "next_token" if m.order == "raster" else "next_group"


##################################################################################
#                                Size registry                                   #
##################################################################################


def transformer_args(m: ModelConfig) -> TransformerArgs:
    """The backbone's arguments (the capacity of a two-half stack's table comes from the model)."""
    base = AR_SIZES.get(m.size, AR_SIZES["debug"])
    dim = m.dim or base["dim"]
    n_head = m.n_head or base["n_head"]
    b = m.backbone
    return TransformerArgs(
        dim=dim,
        n_layer=m.n_layer or base["n_layer"],
        n_head=n_head,
        n_kv_head=m.n_kv_head or n_head,
        # SwiGLU with 2/3 of 4*dim, rounded up to a multiple of 256 (LlamaGen / LLaMA)
        ffn_hidden=b.ffn_hidden or find_multiple(int(2 * 4 * dim / 3), 256),
        norm_eps=b.norm_eps,
        resid_dropout=m.resid_dropout,
        ffn_dropout=m.ffn_dropout,
        attn_dropout=b.attn_dropout,
        drop_path=b.drop_path,
        block_norm=b.block_norm,
        block_norm_affine=b.block_norm_affine,
        ffn=b.ffn,
        ffn_gate=b.ffn_gate,
        bias=b.bias,
        k_bias=b.k_bias,
        qk_norm=b.qk_norm,
        final_adaln=b.final_adaln,
        adaln=b.adaln,
        input_norm=b.input_norm,
        split=b.split,
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
    # xAR's shapes (its encoder + decoder halves as one depth); parameters with its backbone
    "xAR-B": dict(dim=768, n_layer=16, n_head=12),  # 173M
    "xAR-L": dict(dim=1024, n_layer=32, n_head=16),  # 608M
    "xAR-H": dict(dim=1280, n_layer=40, n_head=16),  # 1.19B
    # VAR's shapes (width 64 x depth, a head per layer); parameters with its backbone
    "VAR-d16": dict(dim=1024, n_layer=16, n_head=16),  # 310M
    "VAR-d20": dict(dim=1280, n_layer=20, n_head=20),  # 600M
    "VAR-d24": dict(dim=1536, n_layer=24, n_head=24),  # 1.03B
    "VAR-d30": dict(dim=1920, n_layer=30, n_head=30),  # 2.01B
}
