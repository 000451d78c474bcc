"""Convert xAR checkpoints (OliverRensu/xAR) into argen weights.

    python -m convert.xar xAR-B.pth tokenizer=weights/mar/kl16.safetensors \
        out=weights/xar/xar_b.safetensors [size=xAR-B]
    python sample.py weights=weights/xar/xar_b.safetensors out=grid.png sampling.cfg_scale=2.7 \
        sampling.cfg_schedule=linear_full sampling.flow_steps=40

Layouts (told apart by their top-level keys):
    raw       the state dict itself: the released xAR-B/L/H files (`eval.py` loads them with
              `load_state_dict(torch.load(path))`)
    training  `checkpoint-last.pth`: {"model", "model_ema", "optimizer", "epoch", "scaler",
              "args"}; use_ema=true converts "model_ema". `args` is a pickled
              argparse.Namespace of plain values; it is let through, nothing else is, and only
              the tensors of the chosen entry are read.

The released network is argen's one model with xAR's switches: no prefix (the class enters by
adaLN with the cell's timestep), learned absolute positions before the first half and a second
table between the halves, RMSNorms of eps 1e-6 (no weight inside the blocks), GELU-gated MLP of
width int(8/3 d) with biases, qkv bias, 2D RoPE over the 16 x 16 grid in cell-major order. Keys
are renamed by XAR_KEYS; the persistent buffers `mask` and `*.attn.rope.*` are derived tables:
each is checked against the one argen computes for the inferred grid and cells (a mismatch
means another layout) and then dropped. Width, depth of each half, MLP width, channels and
classes come from the shapes; heads from the RoPE table (head width = 4 * len(freqs)); cells
from the mask.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ar.checkpoint import GENERATOR_KIND
from ar.conditioning import ClassConditionConfig
from ar.config import AR_SIZES, BackboneConfig, GeneratorSpec, ModelConfig
from ar.model import ARModel
from ar.orders import OrderConfig
from common.config import ConfigError, check_fields, to_yaml
from common.dist import get_logger
from common.io import save_weights, sha256_file
from convert.common import load_converted, load_foreign, rename, run_converter, split_keys, up_to_date
from tokenizer import build_tokenizer, read_tokenizer_config, tokenizer_sha256

##################################################################################
#                                  Key tables                                    #
##################################################################################

_BLOCK = {
    "attn.qkv.weight": "attention.wqkv.weight", "attn.qkv.bias": "attention.wqkv.bias",
    "attn.proj.weight": "attention.wo.weight", "attn.proj.bias": "attention.wo.bias",
    "mlp.fc1_g.weight": "feed_forward.w1.weight", "mlp.fc1_g.bias": "feed_forward.w1.bias",
    "mlp.fc1_x.weight": "feed_forward.w3.weight", "mlp.fc1_x.bias": "feed_forward.w3.bias",
    "mlp.fc2.weight": "feed_forward.w2.weight", "mlp.fc2.bias": "feed_forward.w2.bias",
    "ada_lin.1.weight": "modulation.1.weight", "ada_lin.1.bias": "modulation.1.bias",
}
# xAR (models/xar.py) name -> argen ARModel name; decoder block j is layer (encoder depth + j)
XAR_KEYS = {
    "class_emb.weight": "cond.vector_table.weight",
    "time_embed.mlp.0.weight": "inputs.time_embed.mlp.0.weight",
    "time_embed.mlp.0.bias": "inputs.time_embed.mlp.0.bias",
    "time_embed.mlp.2.weight": "inputs.time_embed.mlp.2.weight",
    "time_embed.mlp.2.bias": "inputs.time_embed.mlp.2.bias",
    "z_proj.weight": "inputs.proj.weight", "z_proj.bias": "inputs.proj.bias",
    "encoder_pos_embed_learned": "pos_embed",
    "z_proj_ln.weight": "transformer.input_norm.weight",
    **{f"encoder_blocks.{{i}}.{k}": f"transformer.layers.{{i}}.{v}" for k, v in _BLOCK.items()},
    "encoder_norm.weight": "transformer.mid_norm.weight",
    "decoder_embed.weight": "transformer.mid_proj.weight",
    "decoder_embed.bias": "transformer.mid_proj.bias",
    "decoder_pos_embed_learned": "transformer.mid_pos",
    **{f"decoder_blocks.{{i}}.{k}": f"decoder.{{i}}.{v}" for k, v in _BLOCK.items()},
    "decoder_norm.weight": "transformer.norm.weight",
    "pred.weight": "head.output.weight", "pred.bias": "head.output.bias",
}
# tables xAR stores but recomputes from the architecture: checked, then dropped
XAR_DERIVED = ("mask", "encoder_blocks.{i}.attn.rope.freqs", "encoder_blocks.{i}.attn.rope.freqs_cos",
               "encoder_blocks.{i}.attn.rope.freqs_sin", "decoder_blocks.{i}.attn.rope.freqs",
               "decoder_blocks.{i}.attn.rope.freqs_cos", "decoder_blocks.{i}.attn.rope.freqs_sin")


def _depth(shapes: dict, half: str) -> int:
    return 1 + max(int(m.group(1)) for k in shapes if (m := re.match(rf"{half}_blocks\.(\d+)\.", k)))


def _to_argen(state: dict, enc_depth: int, source: str) -> tuple[dict, dict]:
    mapped, dropped = split_keys(state, XAR_KEYS, XAR_DERIVED, source, project="xAR")
    out = {}
    for key, value in mapped.items():
        m = re.match(r"decoder\.(\d+)\.(.*)", key)
        key = f"transformer.layers.{enc_depth + int(m.group(1))}.{m.group(2)}" if m else key
        out[key] = value[0] if key in ("pos_embed", "transformer.mid_pos") else value  # (1, N, D) -> (N, D)
    return out, dropped


def argen_to_xar(keys, enc_depth: int) -> dict[str, str]:
    """argen name -> xAR name, for error messages and tests."""
    names = {}
    for key in keys:
        m = re.match(r"transformer\.layers\.(\d+)\.(.*)", key)
        if m:
            i, rest = int(m.group(1)), m.group(2)
            inner = {v: k for k, v in _BLOCK.items()}.get(rest, rest)
            half, j = ("encoder", i) if i < enc_depth else ("decoder", i - enc_depth)
            names[key] = f"{half}_blocks.{j}.{inner}"
        else:
            names[key] = rename(key, {v: k for k, v in XAR_KEYS.items() if "{i}" not in k}) or key
    return names


##################################################################################
#                          Architecture from shapes                              #
##################################################################################

def infer_xar_spec(shapes: dict, mask: torch.Tensor | None, downsample: int = 16,
                   source: str = "the checkpoint") -> GeneratorSpec:
    """The GeneratorSpec of an xAR model from its {xAR key: shape} table and its mask."""
    need = ["z_proj.weight", "class_emb.weight", "encoder_pos_embed_learned",
            "encoder_blocks.0.attn.rope.freqs", "decoder_blocks.0.mlp.fc1_g.weight"]
    if any(k not in shapes for k in need):
        raise ValueError(f"{source}: not an xAR state dict: missing "
                         f"{[k for k in need if k not in shapes]}")
    dim, channels = shapes["z_proj.weight"]
    tokens = shapes["encoder_pos_embed_learned"][1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"the position table has {tokens} rows, not a square grid")
    head_dim = 4 * shapes["encoder_blocks.0.attn.rope.freqs"][0]
    enc, dec = _depth(shapes, "encoder"), _depth(shapes, "decoder")
    cells = 1 if mask is None else len(torch.unique(mask[0, 0].isfinite().sum(-1)))
    k = math.isqrt(tokens // cells)
    if k * k * cells != tokens or grid % k:
        raise ValueError(f"the mask has {cells} blocks, which do not tile the {grid}x{grid} grid "
                         f"into square cells")
    rows = shapes["class_emb.weight"][0]
    n_layer, n_head = enc + dec, dim // head_dim
    size = next((name for name, s in AR_SIZES.items()
                 if s == dict(dim=dim, n_layer=n_layer, n_head=n_head)), None)
    backbone = BackboneConfig(norm_eps=1e-6, block_norm_affine=False, ffn_gate="gelu",
                              ffn_hidden=shapes["decoder_blocks.0.mlp.fc1_g.weight"][0], bias=True,
                              adaln=True, input_norm=True, split=enc)
    model = ModelConfig(size=size or "debug", dim=None if size else dim,
                        n_layer=None if size else n_layer, n_head=None if size else n_head,
                        head="flow", order=OrderConfig("whole" if cells == 1 else "cell", cell=k),
                        class_condition=ClassConditionConfig(tokens=0), pos_embed="learned", backbone=backbone,
                        token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    model.validate()
    classes = rows - 1  # xAR's table always ends with the null row (1001 rows, whatever class_num)
    return GeneratorSpec(model=model, latent_channels=channels, grid_h=grid, grid_w=grid,
                         num_classes=classes, class_names=[f"class {i}" for i in range(classes)],
                         resolution=grid * downsample)


def check_derived(model: ARModel, dropped: dict, source: str) -> None:
    """xAR's stored mask and RoPE tables must equal the ones argen derives for the spec."""
    if "mask" in dropped:
        theirs = dropped["mask"][0, 0] == 0  # additive 0 / -inf -> "may attend"
        if not torch.equal(theirs, model.attention_mask()):
            raise ValueError(f"{source}: its attention mask is not the block-causal mask of "
                             f"{model.order}; this is not a layout argen converts")
    rope = model.rope[model.prefix:]  # (N, Dh/2, 2)
    for key, value in dropped.items():
        if key.endswith(("freqs_cos", "freqs_sin")):
            ours = rope[..., 0 if key.endswith("cos") else 1]
            if value.shape != (ours.shape[0], 2 * ours.shape[1]) or not torch.allclose(
                    value.float()[:, ::2], ours, atol=1e-5):
                raise ValueError(f"{source}: {key} differs from the 2D RoPE table argen builds "
                                 f"for {model.order}; this is not a layout argen converts")


##################################################################################
#                                  Converter                                     #
##################################################################################

@dataclass
class XARConvertConfig:
    ckpt: str = "???"  # xAR checkpoint: a released raw state dict, or a training checkpoint-*.pth
    out: str = "???"  # argen generator weights (.safetensors) to write
    tokenizer: str = ""  # the KL-16 VAE as argen weights (python -m convert.mar_vae); path and sha256 go into the spec
    use_ema: bool = False  # training checkpoints: convert "model_ema" instead of "model"
    size: str = ""  # expected size (xAR-B | xAR-L | xAR-H); a checkpoint of another size is an error
    class_names: str = ""  # text file with one class name per line; empty: "class 0", ...

    def validate(self) -> None:
        check_fields(self, "", {"size": ("", "xAR-B", "xAR-L", "xAR-H")})


def select_xar_state(obj, path: Path, use_ema: bool) -> tuple[dict, str]:
    """(the state dict, its entry name) of a raw or training xAR checkpoint."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    entry = "model_ema" if use_ema else "model"
    if "model" in obj:
        state = obj.get(entry)
        if not isinstance(state, dict):
            raise ValueError(f"{path}: no '{entry}' state dict; its keys are {sorted(obj)[:10]}")
    elif use_ema:
        raise ValueError(f"{path}: use_ema=true needs a training checkpoint with 'model_ema'; "
                         f"this is a raw state dict (the released files are the EMA weights)")
    else:
        state, entry = obj, "raw"
    bad = sorted(k for k, v in state.items() if not torch.is_tensor(v))
    if bad:
        raise ValueError(f"{path}: entries of the {entry} state dict are not tensors: {bad[:8]}")
    return dict(state), entry


def _describe(spec: GeneratorSpec) -> str:
    m = spec.model
    a = AR_SIZES.get(m.size) if m.dim is None else dict(dim=m.dim, n_layer=m.n_layer, n_head=m.n_head)
    return (f"{m.size if m.dim is None else 'a custom size'} (width {a['dim']}, {m.backbone.split}+"
            f"{a['n_layer'] - m.backbone.split} blocks, {a['n_head']} heads)")


def _tokenizer(path: str):
    """The tokenizer's module built on the meta device (its facts, without its weights)."""
    with torch.device("meta"):
        return build_tokenizer(read_tokenizer_config(path))


def convert_xar(cfg: XARConvertConfig, reuse: bool = False) -> Path:
    """Write argen generator weights for an xAR checkpoint; `reuse` keeps an up-to-date `out`."""
    log = get_logger("convert")
    obj, path = load_foreign(cfg.ckpt, "xar")
    state, entry = select_xar_state(obj, path, cfg.use_ema)
    tok = _tokenizer(cfg.tokenizer) if cfg.tokenizer else None
    spec = infer_xar_spec({k: tuple(v.shape) for k, v in state.items()}, state.get("mask"),
                          tok.downsample if tok is not None else 16, str(path))
    if cfg.size and spec.model.size != cfg.size:
        raise ValueError(f"{path} is {_describe(spec)}, not {cfg.size} "
                         f"({AR_SIZES[cfg.size]}); pass the checkpoint of that size or size={spec.model.size}")
    if cfg.class_names:
        names = [x.strip() for x in Path(cfg.class_names).read_text().splitlines() if x.strip()]
        if len(names) != spec.num_classes:
            raise ConfigError(f"{cfg.class_names}: {len(names)} names for {spec.num_classes} classes")
        spec.class_names = names
    if tok is not None:
        if tok.kind != "continuous" or tok.latent_channels != spec.latent_channels:
            raise ValueError(f"tokenizer {cfg.tokenizer} is not a KL autoencoder with "
                             f"{spec.latent_channels} latent channels; convert MAR's kl16.ckpt "
                             f"with python -m convert.mar_vae")
        spec.tokenizer_path = str(Path(cfg.tokenizer).resolve())
        spec.tokenizer_sha256 = tokenizer_sha256(cfg.tokenizer)
    else:
        log.warning("no tokenizer= given: sample.py will need tokenizer=PATH for these weights")
    enc = spec.model.backbone.split
    mapped, dropped = _to_argen(state, enc, str(path))
    source = {"project": "OliverRensu/xAR", "file": path.name, "sha256": sha256_file(path),
              "entry": entry, "dropped": sorted(dropped), "converter": __name__}
    if reuse and up_to_date(Path(cfg.out), to_yaml(spec), source):
        log.info(f"{cfg.out} is up to date with {path}")
        return Path(cfg.out)
    model = load_converted(lambda: ARModel(spec), mapped, str(path),
                           lambda k: argen_to_xar([k], enc)[k])
    model.reset_buffers("cpu")
    check_derived(model, dropped, str(path))
    out = save_weights(cfg.out, model.state_dict(), GENERATOR_KIND, to_yaml(spec),
                       extra={"source": json.dumps(source)})
    log.info(f"{path.name} ({entry}) -> {out}: {_describe(spec)}, {spec.model.order.name} "
             f"{spec.model.order.cell}x{spec.model.order.cell} cells on {spec.grid_h}x{spec.grid_w} latents of "
             f"{spec.latent_channels} channels, {spec.num_classes} classes")
    return out


def main(argv: list[str] | None = None) -> Path:
    return run_converter(convert_xar, XARConvertConfig, __doc__, argv)


if __name__ == "__main__":
    main()
