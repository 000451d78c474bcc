"""VAR's transformer (var_d16/20/24/30.pth) -> argen generator weights; the command is
`python -m convert.var var` (convert/var.py).

The released network is argen's one model with VAR's switches (configs/imagenet256/VAR-d*.yaml
train the same): the scale order over the tokenizer's schedule with next-scale inputs (the
downsampled cumulative reconstruction of coarser scales through `word_embed`); the prefix is
the first scale's input, the class vector itself plus `pos_start` (cond_prefix=vector); learned
absolute positions and level embeddings, no RoPE; the block with LayerNorm without affine,
six-way adaLN from the class vector, GELU(tanh) MLP of width 4d, q/v bias without k bias,
l2-normalised attention with a per-head scale clamped at 100; adaLN before the head; a head
bias. The facts that are not in the shapes (eps 1e-6, the clamp) are the release's.

Keys are renamed by VAR_KEYS. Three are merged: `attn.q_bias`, `attn.zero_k_bias` (a zero
buffer) and `attn.v_bias` become the one qkv bias, with the k part kept at zero by the block;
`pos_start` is added to the first rows of `pos_1LC` (both are learned tables added to the same
positions). The persistent buffers `lvl_1L` and `attn_bias_for_masking` are derived tables:
each is checked against the one argen computes for the schedule, then dropped. The quantiser
the inputs rebuild features with is a frozen copy of the tokenizer's (tokenizer=, the converted
VQVAE), whose schedule must give the checkpoint's token count. VAR-d36's shared adaLN
(`shared_ada_lin`, `ada_gss`) is not converted.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ar.checkpoint import GENERATOR_KIND
from ar.conditioning import ClassConditionConfig
from ar.config import AR_SIZES, BackboneConfig, GeneratorSpec, ModelConfig, MultiScaleSpec
from ar.heads import TokenHeadConfig
from ar.inputs import InputsConfig
from ar.model import ARModel
from ar.orders import OrderConfig
from common.config import ConfigError, check_fields, to_yaml
from common.dist import get_logger
from common.io import save_weights, sha256_file
from convert.common import load_converted, load_foreign, rename, split_keys, up_to_date
from convert.var_vqvae import _raw_state
from tokenizer import load_tokenizer, tokenizer_sha256

##################################################################################
#                                  Key tables                                    #
##################################################################################

_BLOCK = {
    "attn.mat_qkv.weight": "attention.wqkv.weight", "attn.qkv_bias": "attention.wqkv.bias",
    "attn.scale_mul_1H11": "attention.scale_log",
    "attn.proj.weight": "attention.wo.weight", "attn.proj.bias": "attention.wo.bias",
    "ffn.fc1.weight": "feed_forward.w1.weight", "ffn.fc1.bias": "feed_forward.w1.bias",
    "ffn.fc2.weight": "feed_forward.w2.weight", "ffn.fc2.bias": "feed_forward.w2.bias",
    "ada_lin.1.weight": "modulation.1.weight", "ada_lin.1.bias": "modulation.1.bias",
}
# VAR (models/var.py, basic_var.py) name -> argen ARModel name; `attn.qkv_bias` and `pos_1LC`
# are the merged tensors described above
VAR_KEYS = {
    "class_emb.weight": "cond.vector_table.weight",
    "pos_1LC": "pos_embed",
    "lvl_embed.weight": "level_embed.weight",
    "word_embed.weight": "inputs.word_embed.weight", "word_embed.bias": "inputs.word_embed.bias",
    **{f"blocks.{{i}}.{k}": f"transformer.layers.{{i}}.{v}" for k, v in _BLOCK.items()},
    "head_nm.ada_lin.1.weight": "transformer.final_modulation.1.weight",
    "head_nm.ada_lin.1.bias": "transformer.final_modulation.1.bias",
    "head.weight": "head.output.weight", "head.bias": "head.output.bias",
}
VAR_DERIVED = ("lvl_1L", "attn_bias_for_masking")  # checked against argen's, then dropped
VAR_SHARED_ADALN = ("shared_ada_lin.1.weight", "blocks.0.ada_gss")  # VAR-d36


def merge_var_tensors(state: dict, source: str) -> dict:
    """VAR's split q/k/v biases -> one qkv bias; pos_start folded into pos_1LC (L, D)."""
    state = dict(state)
    for key in [k for k in state if k.endswith(".attn.q_bias")]:
        block = key[: -len("q_bias")]
        zero_k = state.pop(block + "zero_k_bias", None)
        v_bias = state.pop(block + "v_bias", None)
        if zero_k is None or v_bias is None:
            raise ValueError(f"{source}: {key} without {block}zero_k_bias and {block}v_bias")
        if not zero_k.is_meta and zero_k.any():  # (meta: a shapes-only check)
            raise ValueError(f"{source}: {block}zero_k_bias is not zero; VAR keeps the key bias "
                             f"at zero, and so does argen's block")
        state[block + "qkv_bias"] = torch.cat([state.pop(key), zero_k, v_bias])
    if "pos_start" in state and "pos_1LC" in state:
        start, pos = state.pop("pos_start")[0], state["pos_1LC"][0].clone()  # (first_l, D), (L, D)
        pos[: len(start)] += start
        state["pos_1LC"] = pos
    return state


def argen_to_var(keys) -> dict[str, str]:
    """argen name -> VAR name, for error messages."""
    inverse = {v: k for k, v in VAR_KEYS.items()}
    names = {}
    for key in keys:
        m = re.match(r"transformer\.layers\.(\d+)\.(.*)", key)
        if m:
            inner = {v: k for k, v in _BLOCK.items()}.get(m.group(2), m.group(2))
            names[key] = f"blocks.{m.group(1)}.{inner}"
        elif key.startswith("inputs.quantizer."):
            names[key] = f"(the tokenizer's) {key[len('inputs.quantizer.'):]}"
        else:
            names[key] = rename(key, inverse) or key
    return names


##################################################################################
#                          Architecture from shapes                              #
##################################################################################

VAR_BLOCK = dict(norm_eps=1e-6, block_norm="layer", block_norm_affine=False, ffn="mlp",
                 ffn_gate="gelu_tanh", bias=True, k_bias=False, qk_norm=True, adaln=True,
                 final_adaln=True)


def var_model_config(dim: int, depth: int, heads: int, ffn_hidden: int, first_l: int) -> ModelConfig:
    """VAR's architecture as an argen ModelConfig (a registered VAR-d size where one fits)."""
    size = next((name for name, s in AR_SIZES.items()
                 if s == dict(dim=dim, n_layer=depth, n_head=heads)), None)
    return ModelConfig(size=size or "debug", dim=None if size else dim, n_layer=None if size else depth,
                       n_head=None if size else heads, head="token",
                       token_head=TokenHeadConfig(bias=True),
                       backbone=BackboneConfig(ffn_hidden=ffn_hidden, **VAR_BLOCK), order=OrderConfig("scale"),
                       inputs=InputsConfig("next_scale"), rope="none",
                       class_condition=ClassConditionConfig(tokens=first_l, prefix="vector"),
                       pos_embed="learned", level_embed=True, token_dropout=0.0,
                       resid_dropout=0.0, ffn_dropout=0.0)


def infer_var_spec(shapes: dict, tokenizer, source: str) -> GeneratorSpec:
    """The GeneratorSpec of a VAR transformer from its {VAR key: shape} table (after
    merge_var_tensors) and the multi-scale tokenizer it generates codes of."""
    if any(k in shapes for k in VAR_SHARED_ADALN):
        raise ValueError(f"{source}: shared adaLN (shared_ada_lin + blocks.*.ada_gss, VAR-d36) "
                         f"is not supported; the per-block adaLN models (d16-d30) are")
    need = ["class_emb.weight", "pos_1LC", "lvl_embed.weight", "word_embed.weight",
            "blocks.0.attn.scale_mul_1H11", "blocks.0.ffn.fc1.weight", "head.weight"]
    if any(k not in shapes for k in need):
        raise ValueError(f"{source}: not a VAR transformer state dict (FoundationVision/VAR "
                         f"models/var.py): missing {[k for k in need if k not in shapes]}")
    rows, dim = shapes["class_emb.weight"]  # num_classes + 1: VAR always keeps the null row
    tokens, scales = shapes["pos_1LC"][0], shapes["lvl_embed.weight"][0]
    vocab, code_dim = shapes["head.weight"][0], shapes["word_embed.weight"][1]
    depth = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k)))
    pn = list(tokenizer.patch_nums)
    if len(pn) != scales or sum(p * p for p in pn) != tokens:
        raise ValueError(f"{source} was trained on {scales} scales of {tokens} tokens in all, but "
                         f"the tokenizer's schedule {pn} has {len(pn)} scales of "
                         f"{sum(p * p for p in pn)}: convert the VQVAE with the schedule this "
                         f"transformer was trained with (convert.var vqvae ... patch_nums=[...])")
    if (tokenizer.codebook_size, tokenizer.cfg.codebook_dim) != (vocab, code_dim):
        raise ValueError(f"{source} predicts {vocab} codes of {code_dim} channels; the tokenizer "
                         f"has {tokenizer.codebook_size} of {tokenizer.cfg.codebook_dim}")
    model = var_model_config(dim, depth, shapes["blocks.0.attn.scale_mul_1H11"][1],
                             shapes["blocks.0.ffn.fc1.weight"][0], pn[0] * pn[0])
    model.validate()
    t = tokenizer.cfg
    return GeneratorSpec(model=model, vocab_size=vocab,
                         multiscale=MultiScaleSpec(patch_nums=pn, code_dim=code_dim,
                                                   quant_resi=t.quant_resi,
                                                   share_quant_resi=t.share_quant_resi),
                         grid_h=pn[-1], grid_w=pn[-1], num_classes=rows - 1,
                         class_names=[f"class {i}" for i in range(rows - 1)],
                         resolution=pn[-1] * tokenizer.downsample)


def check_derived(model: ARModel, dropped: dict, source: str) -> None:
    """VAR's stored level index and mask must equal the ones argen derives for the schedule."""
    checks = {"lvl_1L": (lambda v: v[0], model.levels, "level of each position"),
              "attn_bias_for_masking": (lambda v: v[0, 0] == 0, model.attention_mask(),
                                        "block-causal mask over scales")}
    for key, (read, ours, what) in checks.items():
        if key in dropped and not torch.equal(read(dropped[key]).to(ours.device), ours):
            raise ValueError(f"{source}: its {key} is not the {what} argen derives for the "
                             f"scales {model.order.scales}; this is not a layout argen converts")


##################################################################################
#                                  Converter                                     #
##################################################################################

VAR_SIZES = ("VAR-d16", "VAR-d20", "VAR-d24", "VAR-d30")


@dataclass
class VARConvertConfig:
    ckpt: str = "???"  # VAR transformer checkpoint (var_d16.pth ...): a raw state dict
    out: str = "???"  # argen generator weights (.safetensors) to write
    tokenizer: str = "???"  # the VQVAE as argen weights (python -m convert.var vqvae); its quantiser is copied, its path and sha256 go into the spec
    size: str = ""  # expected size (VAR-d16 | VAR-d20 | VAR-d24 | VAR-d30); a checkpoint of another depth is an error
    class_names: str = ""  # text file with one class name per line; empty: "class 0", ...

    def validate(self) -> None:
        check_fields(self, "", {"size": ("", *VAR_SIZES)})


def _describe(spec: GeneratorSpec) -> str:
    m = spec.model
    a = AR_SIZES[m.size] if m.dim is None else dict(dim=m.dim, n_layer=m.n_layer, n_head=m.n_head)
    name = m.size if m.dim is None else "a custom size"
    return f"{name} (depth {a['n_layer']}, width {a['dim']}, {a['n_head']} heads)"


def convert_var(cfg: VARConvertConfig, reuse: bool = False) -> Path:
    """Write argen generator weights for a VAR transformer; `reuse` keeps an up-to-date `out`."""
    log = get_logger("convert")
    obj, path = load_foreign(cfg.ckpt, "var")
    state = merge_var_tensors(_raw_state(obj, path), str(path))
    tok = load_tokenizer(cfg.tokenizer)
    if tok.kind != "multiscale":
        raise ValueError(f"tokenizer={cfg.tokenizer} is a {tok.kind} tokenizer; VAR needs its "
                         f"multi-scale VQVAE: python -m convert.var vqvae vae_ch160v4096z32.pth OUT")
    spec = infer_var_spec({k: tuple(v.shape) for k, v in state.items()}, tok, str(path))
    if cfg.size and spec.model.size != cfg.size:
        raise ValueError(f"{path} is {_describe(spec)}, not {cfg.size} ({AR_SIZES[cfg.size]}); "
                         f"pass the checkpoint of that depth or size={spec.model.size}")
    if cfg.class_names:
        names = [x.strip() for x in Path(cfg.class_names).read_text().splitlines() if x.strip()]
        if len(names) != spec.num_classes:
            raise ConfigError(f"{cfg.class_names}: {len(names)} names for {spec.num_classes} classes")
        spec.class_names = names
    spec.tokenizer_path = str(Path(cfg.tokenizer).resolve())
    spec.tokenizer_sha256 = tokenizer_sha256(cfg.tokenizer)
    mapped, dropped = split_keys(state, VAR_KEYS, VAR_DERIVED, str(path), project="VAR")
    # (1, H, 1, 1) per-head scales -> (H,)
    mapped = {k: v.float().flatten() if k.endswith("scale_log") else v.float() for k, v in mapped.items()}
    mapped.update({f"inputs.quantizer.{k}": v for k, v in tok.quantize.state_dict().items()})
    source = {"project": "FoundationVision/VAR", "file": path.name, "sha256": sha256_file(path),
              "layout": "raw", "dropped": sorted(dropped), "converter": __name__}
    if reuse and up_to_date(Path(cfg.out), to_yaml(spec), source):
        log.info(f"{cfg.out} is up to date with {path}")
        return Path(cfg.out)
    model = load_converted(lambda: ARModel(spec), mapped, str(path), lambda k: argen_to_var([k])[k])
    model.reset_buffers("cpu")
    check_derived(model, dropped, str(path))
    out = save_weights(cfg.out, model.state_dict(), GENERATOR_KIND, to_yaml(spec),
                       extra={"source": json.dumps(source)})
    log.info(f"{path.name} -> {out}: {_describe(spec)}, scales {spec.multiscale.patch_nums}, "
             f"{spec.num_classes} classes")
    return out
