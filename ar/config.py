"""The generator's configuration: the backbone's switches, the model config (backbone fields
plus one section per part: order, inputs, head, condition), the pairing rules between parts,
and the GeneratorSpec (the config plus what the code cache dictates, stored in every weights
file). The size registry is at the bottom."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ar.conditioning import (CONDITIONS, TEXT, ClassConditionConfig, TextConditionConfig, TextSpec,
                             condition_entry)
from ar.data import MultiScaleSpec
from ar.heads import HEADS, FlowHeadConfig, TokenHeadConfig
from ar.inputs import INPUTS, InputsConfig
from ar.orders import OrderConfig
from ar.transformer import TransformerArgs, find_multiple
from common.config import ConfigError, check_fields

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


# flat keys of earlier versions -> (section, key); model.cond_add goes to the condition's section
_MOVED = {"cell": ("order", "cell"), "subsample": ("order", "subsample"),
          "shuffle_blocks": ("inputs", "shuffle_blocks"), "cond_tokens": ("class_condition", "tokens"),
          "cond_prefix": ("class_condition", "prefix"), "text_loss": ("text_condition", "loss")}


@dataclass
class ModelConfig:
    size: str = "debug"  # a name in AR_SIZES: debug, AR-Nano, AR-B, AR-L, AR-XL, AR-XXL, AR-3B, xAR-B, xAR-L, xAR-H, VAR-d16, VAR-d20, VAR-d24, VAR-d30
    dim: Optional[int] = None  # override the size's width
    n_layer: Optional[int] = None  # override the size's depth
    n_head: Optional[int] = None  # override the size's number of attention heads
    n_kv_head: Optional[int] = None  # key/value heads for grouped-query attention (None: = n_head)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)  # the block's switches
    order: OrderConfig = field(default_factory=OrderConfig)  # generation order: model.order.name and its size (ar/orders.py)
    inputs: InputsConfig = field(default_factory=InputsConfig)  # what the transformer sees per step: model.inputs.name (ar/inputs.py)
    head: str = "token"  # prediction head, a name in ar.heads.HEADS: token (discrete codes) | flow (latents)
    token_head: TokenHeadConfig = field(default_factory=TokenHeadConfig)  # the token head's options
    flow_head: FlowHeadConfig = field(default_factory=FlowHeadConfig)  # the flow head's options
    condition: str = "class"  # class (labels) | text (captions: the cache's caption tokens or encoder features, `tokenizer.encode text.kind=...`) | a name in ar.conditioning.CONDITIONS
    class_condition: ClassConditionConfig = field(default_factory=ClassConditionConfig)  # the class condition's options
    text_condition: TextConditionConfig = field(default_factory=TextConditionConfig)  # the caption conditions' options
    rope: str = "2d"  # rotary position embedding: 2d (LlamaGen's layout) | none (VAR: learned positions only)
    rope_base: float = 10000.0  # rotary embedding base
    cond_rope: str = "zero"  # rotation at condition positions: zero (LlamaGen: q/k zeroed) | identity
    pos_embed: str = "none"  # absolute position embedding added to the inputs: none (LlamaGen) | learned
    level_embed: bool = False  # a learned embedding per step added at the positions predicting it (VAR's lvl_embed)
    token_dropout: float = 0.1  # dropout on the input embeddings (LlamaGen: 0.1)
    resid_dropout: float = 0.1  # dropout on each residual branch (LlamaGen: 0.1)
    ffn_dropout: float = 0.1  # dropout inside the feed-forward (LlamaGen: 0.1)

    @staticmethod
    def upgrade_legacy(raw: dict, context=None) -> list[str]:
        """Flat keys of earlier versions (model.order=cell, model.cell=2, model.cond_tokens=0,
        ...) moved into the parts' sections; returns a note per key moved."""
        notes = []
        for name in ("order", "inputs"):
            if isinstance(raw.get(name), str):
                raw[name] = {"name": raw[name]}
                notes.append(f"model.{name}={raw[name]['name']} is now model.{name}.name")
        moved = dict(_MOVED)
        condition = raw.get("condition", context.get("condition") if context is not None else "class")
        moved["cond_add"] = ("text_condition", "pooled") if condition == TEXT else ("class_condition", "add")
        for old, (section, key) in moved.items():
            if old in raw:
                target = raw.setdefault(section, {})
                target.setdefault(key, raw.pop(old))
                notes.append(f"model.{old} is now model.{section}.{key} (the old key still works)")
        return notes

    def validate(self) -> None:
        if self.size not in AR_SIZES:
            raise ConfigError(f"model.size={self.size!r} is not a known size; choose one of "
                              f"{sorted(AR_SIZES)} (or set model.dim/n_layer/n_head)")
        if self.head not in HEADS:
            raise ConfigError(f"model.head={self.head!r}; choose one of {sorted(HEADS)}")
        check_fields(self, "model.", {"condition": (TEXT, *CONDITIONS),
                                      "cond_rope": ("zero", "identity"), "pos_embed": ("none", "learned"),
                                      "rope": ("2d", "none"), "dim": ">= 1", "n_layer": ">= 1",
                                      "n_head": ">= 1", "n_kv_head": ">= 1", "rope_base": "> 0",
                                      "token_dropout": "[0, 1)", "resid_dropout": "[0, 1)",
                                      "ffn_dropout": "[0, 1)"})
        for part in (self.backbone, self.order, self.inputs, self.class_condition, self.text_condition):
            part.validate()
        check_pairings(self)
        condition_entry(self.condition).validate(self, input_kind(self))
        self._validate_shape()

    def _validate_shape(self) -> None:
        a = transformer_args(self)
        if a.split >= a.n_layer:
            raise ConfigError(f"model.backbone.split={a.split} must be below the number of "
                              f"layers ({a.n_layer})")
        if a.dim % a.n_head or a.n_head % a.n_kv_head or a.head_dim % 4:
            raise ConfigError(f"model: dim {a.dim} must split into {a.n_head} heads of a width "
                              f"divisible by 4, and n_head must be a multiple of n_kv_head "
                              f"({a.n_kv_head})")


##################################################################################
#                          Which parts go together                               #
##################################################################################

# parts that only go with each other: (key, value) needs (key, value) and back, and why
PAIRINGS = (
    (("head", "flow"), ("inputs", "flow"),
     "the flow head needs model.inputs.name=flow (or auto), and flow inputs the flow head"),
    (("order", "scale"), ("inputs", "next_scale"),
     "next-scale inputs go with the scale order and the scale order with them"),
)


def part_names(m: ModelConfig) -> dict[str, str]:
    """The registry name of each part the config picks (inputs resolved from auto)."""
    return {"head": m.head, "order": m.order.name, "inputs": input_kind(m)}


def check_pairings(m: ModelConfig) -> None:
    names = part_names(m)
    for (a, va), (b, vb), why in PAIRINGS:
        if (names[a] == va) != (names[b] == vb):
            raise ConfigError(f"model.{a}={names[a]} with model.{b}={names[b]}: {why}")


# inputs=auto: the first (part, name) that matches picks the inputs; else by the order's steps
AUTO_INPUTS = ((("head", "flow"), "flow"), (("order", "scale"), "next_scale"),
               (("order", "raster"), "next_token"))


def input_kind(m: ModelConfig) -> str:
    if m.inputs.name != "auto":
        return m.inputs.name
    names = {"head": m.head, "order": m.order.name}
    return next((kind for (part, name), kind in AUTO_INPUTS if names[part] == name), "next_group")


def tokenizer_kind(m: ModelConfig) -> str:
    """The kind of tokenizer, and of code cache, the model is trained on: discrete (one code
    grid), multiscale (every scale's codes) or continuous (latents)."""
    return INPUTS[input_kind(m)].tokenizer_kind


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
