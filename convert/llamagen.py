"""Convert LlamaGen class-conditional checkpoints (FoundationVision/LlamaGen) into argen weights.

    # 1. the VQ-16 tokenizer (its sha256 goes into the generator's weights, sample.py checks it)
    python -m convert.llamagen vq pretrained_models/vq_ds16_c2i.pt \
        out=weights/llamagen/vq_ds16_c2i.safetensors
    # 2. a GPT, trained at 256 (c2i_B_256.pt, c2i_L_256.pt) or 384 (c2i_*_384.pt) pixels
    python -m convert.llamagen gpt pretrained_models/c2i_XL_384.pt image_size=384 \
        tokenizer=weights/llamagen/vq_ds16_c2i.safetensors out=weights/llamagen/c2i_XL_384.safetensors
    # 3. use it like any argen generator
    python sample.py weights=weights/llamagen/c2i_XL_384.safetensors out=grid.png sampling.cfg_scale=4.0

The first word picks the converter (gpt | vq); the checkpoint path may come next or as ckpt=...;
everything else is key=value (`python -m convert.llamagen gpt --help` lists the keys).

Checkpoint layouts (layout=auto tells them apart by their top-level keys):
    ddp        {"model": state_dict[, "ema": state_dict, "optimizer", "steps", "args"]}
               (train_c2i.py; B, L, XL and the VQ). use_ema=true takes "ema".
    fsdp       the raw state dict (train_c2i_fsdp.py's consolidated.pth; the released XXL and
               3B files). A folder holding consolidated.pth may be passed instead of the file.
    deepspeed  {"module": state_dict, ...}
Files are read with torch.load(weights_only=True): tensors, containers and plain values only.
The one class let through is argparse.Namespace, the training arguments LlamaGen pickles next to
the weights (it holds plain values); any other pickled object is refused.

Keys are renamed by the explicit tables GPT_KEYS (below) and VQ_DERIVED; the VQ's names already
equal argen's. Keys that hold derived tables rather than weights (`freqs_cis`, KV caches,
`quantize.codebook_used`) are dropped; a stored `freqs_cis` is first checked against the
rotary table of the requested image_size. Unknown, missing or mis-shaped keys are an error that
lists them by their LlamaGen names.

The architecture is read from the tensor shapes: width and vocabulary from tok_embeddings,
depth from the layer indices, key/value heads from wqkv. Two facts are not in the shapes:
- heads: LlamaGen's size table by (width, depth); a width and depth not in it need n_head=.
  Where the file holds LlamaGen's training args (`args`), their gpt_model must agree with n_head=.
- classes: LlamaGen's class table has num_classes + 1 rows when trained with class dropout (the
  last is the null class, id num_classes, as in argen) and num_classes rows without. The count
  comes from num_classes=, else the args' num_classes (or class_dropout_prob), else rows - 1 when
  that is a known count (1000: ImageNet, every release); other tables need num_classes=. A table
  without the null row cannot be converted: argen's classifier-free guidance needs that row.
The code grid is image_size / downsample. A shape that equals an entry of ar.model.AR_SIZES is
stored under that name (GPT-B/L/XL/XXL -> AR-B/L/XL/XXL); others (GPT-3B, GPT-1B, GPT-XXXL,
GPT-7B) are stored as explicit dim/n_layer/n_head overrides.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ar.checkpoint import GENERATOR_KIND
from ar.conditioning import ClassConditionConfig
from ar.config import AR_SIZES, GeneratorSpec, ModelConfig
from ar.model import ARModel
from ar.orders import OrderConfig
from common.config import ConfigError, check_fields, to_yaml
from common.dist import get_logger
from common.io import save_weights, sha256_file
from convert.common import (LAYOUTS, checkpoint_args, load_converted, load_foreign, rename,
                            run_commands, select_state, split_keys, up_to_date)
from tokenizer import WEIGHTS_KIND, build_tokenizer, read_tokenizer_config
from tokenizer.vq import VQConfig, VQModel

##################################################################################
#                                  Key tables                                    #
##################################################################################

# LlamaGen GPT (autoregressive/models/gpt.py) name -> argen ARModel name; {i} is a layer index
GPT_KEYS = {
    "cls_embedding.embedding_table.weight": "cond.embedding_table.weight",
    "tok_embeddings.weight": "tok_embeddings.weight",
    "layers.{i}.attention_norm.weight": "transformer.layers.{i}.attention_norm.weight",
    "layers.{i}.attention.wqkv.weight": "transformer.layers.{i}.attention.wqkv.weight",
    "layers.{i}.attention.wo.weight": "transformer.layers.{i}.attention.wo.weight",
    "layers.{i}.ffn_norm.weight": "transformer.layers.{i}.ffn_norm.weight",
    "layers.{i}.feed_forward.w1.weight": "transformer.layers.{i}.feed_forward.w1.weight",
    "layers.{i}.feed_forward.w3.weight": "transformer.layers.{i}.feed_forward.w3.weight",
    "layers.{i}.feed_forward.w2.weight": "transformer.layers.{i}.feed_forward.w2.weight",
    "norm.weight": "transformer.norm.weight",
    "output.weight": "head.output.weight",
}
# tables LlamaGen recomputes from the architecture; present only in some saves, never weights
GPT_DERIVED = ("freqs_cis", "causal_mask", "layers.{i}.attention.kv_cache.k_cache",
               "layers.{i}.attention.kv_cache.v_cache")
# LlamaGen's persistent code-usage counter; argen keeps usage in a non-persistent buffer
VQ_DERIVED = ("quantize.codebook_used",)

# LlamaGen's GPT_models: (width, depth) -> (name, heads); the heads are not visible in the shapes
LLAMAGEN_SIZES = {
    (768, 12): ("GPT-B", 12), (1024, 24): ("GPT-L", 16), (1280, 36): ("GPT-XL", 20),
    (1536, 48): ("GPT-XXL", 24), (2560, 48): ("GPT-XXXL", 40), (2048, 22): ("GPT-1B", 32),
    (3200, 24): ("GPT-3B", 32), (4096, 32): ("GPT-7B", 32),
}
# the class count a table of count + 1 rows is read as without args or num_classes=: ImageNet's
# (every released c2i checkpoint)
KNOWN_CLASS_COUNTS = (1000,)


def argen_to_llamagen(keys) -> dict[str, str]:
    """argen name -> LlamaGen name (the inverse of GPT_KEYS), for error messages and tests."""
    inverse = {dst: src for src, dst in GPT_KEYS.items()}
    return {k: rename(k, inverse) or k for k in keys}


##################################################################################
#                          Architecture from shapes                              #
##################################################################################

def _args_size(args: dict, dim: int, n_layer: int) -> tuple[str, int] | None:
    """(name, heads) of the LlamaGen size the training args name (gpt_model), when the weights
    have its width and depth; args naming another size are not this file's, and are ignored."""
    name = args.get("gpt_model")
    shape = next((wd for wd, (n, _) in LLAMAGEN_SIZES.items() if n == name), None)
    if shape is None:
        return None
    if shape != (dim, n_layer):
        get_logger("convert").warning(f"the checkpoint's args name gpt_model={name} ({shape[0]} "
                                      f"wide, {shape[1]} layers) but its weights are {dim} wide "
                                      f"with {n_layer} layers; the args' size is ignored")
        return None
    return LLAMAGEN_SIZES[shape]


def resolve_heads(dim: int, n_layer: int, n_head: int, args: dict, source: str) -> int:
    """The head count (not visible in the shapes): n_head=, else LlamaGen's size table."""
    named = _args_size(args, dim, n_layer)
    if named and n_head and n_head != named[1]:
        raise ConfigError(f"{source}: n_head={n_head}, but its training args say gpt_model="
                          f"{named[0]}, which has {named[1]} heads; drop n_head=")
    size = LLAMAGEN_SIZES.get((dim, n_layer))
    if n_head or size:
        return n_head or size[1]
    raise ConfigError(f"{source}: width {dim} with {n_layer} layers is not one of LlamaGen's sizes "
                      f"({', '.join(v[0] for v in LLAMAGEN_SIZES.values())}), and the head count "
                      f"is not visible in the shapes: pass n_head= (the heads it was trained with)")


def resolve_classes(rows: int, num_classes: int, args: dict, source: str) -> int:
    """The class count of a class table of `rows` rows (num_classes + 1 with class dropout,
    num_classes without): num_classes=, the training args, or a known count + the null row."""
    trained, dropout = args.get("num_classes"), args.get("class_dropout_prob")
    if num_classes and trained and num_classes != trained:
        raise ConfigError(f"{source}: num_classes={num_classes}, but its training args say "
                          f"num_classes={trained}; drop num_classes=")
    classes = num_classes or trained or (rows - (dropout > 0) if dropout is not None else 0)
    if not classes:
        if rows - 1 not in KNOWN_CLASS_COUNTS:
            raise ConfigError(f"{source}: its class table has {rows} rows: {rows - 1} classes and the "
                              f"null row of class dropout, or {rows} classes trained without it, and "
                              f"no training args in the file say which: pass num_classes={rows - 1} "
                              f"(trained with class dropout, LlamaGen's default)")
        classes = rows - 1
    if rows == classes + 1 and dropout != 0:
        return classes
    if rows == classes and not dropout:
        raise ValueError(f"{source}: its class table has {rows} rows for {classes} classes: no "
                         f"null-class row (trained without class dropout); argen's class table "
                         f"and classifier-free guidance need one, so it cannot be converted")
    said = "" if dropout is None else f" (its args: class_dropout_prob={dropout})"
    raise ValueError(f"{source}: its class table has {rows} rows, which fits {classes} classes "
                     f"neither with the null row nor without it{said}; pass the num_classes= it "
                     f"was trained with")


def infer_gpt_spec(shapes: dict, image_size: int, downsample: int, n_head: int = 0,
                   num_classes: int = 0, class_names: list[str] | None = None,
                   args: dict | None = None, source: str = "the checkpoint") -> GeneratorSpec:
    """The GeneratorSpec of a LlamaGen c2i GPT from its {LlamaGen key: shape} table and the
    training args saved with it ({} where none)."""
    if any(k.startswith("cls_embedding.cap_proj") for k in shapes):
        raise ValueError(f"{source} is a text-to-image (t2i) LlamaGen checkpoint; only class-"
                         f"conditional (c2i) checkpoints convert to argen")
    need = ["tok_embeddings.weight", "cls_embedding.embedding_table.weight",
            "layers.0.attention.wqkv.weight"]
    if any(k not in shapes for k in need):
        raise ValueError(f"{source}: not a LlamaGen c2i GPT state dict: missing "
                         f"{[k for k in need if k not in shapes]}")
    if image_size <= 0 or downsample <= 0 or image_size % downsample:
        raise ConfigError(f"image_size={image_size} must be a positive multiple of downsample="
                          f"{downsample}: use the resolution the checkpoint was trained at "
                          f"(LlamaGen: 256 for c2i_*_256.pt, 384 for c2i_*_384.pt)")
    vocab, dim = shapes["tok_embeddings.weight"]
    rows, width = shapes["cls_embedding.embedding_table.weight"]
    if width != dim:
        raise ValueError(f"{source}: class table width {width} differs from the model width {dim}; "
                         f"only one class token per image (cls_token_num=1) is supported")
    classes = resolve_classes(rows, num_classes, args or {}, source)
    n_layer = 1 + max(int(m.group(1)) for k in shapes if (m := re.match(r"layers\.(\d+)\.", k)))
    n_head = resolve_heads(dim, n_layer, n_head, args or {}, source)
    if dim % n_head:
        raise ConfigError(f"n_head={n_head} does not divide the width {dim} of {source}")
    head_dim = dim // n_head
    n_kv_head = (shapes["layers.0.attention.wqkv.weight"][0] // head_dim - n_head) // 2
    size = next((name for name, s in AR_SIZES.items()
                 if s == dict(dim=dim, n_layer=n_layer, n_head=n_head)), None)
    grid = image_size // downsample
    model = ModelConfig(size=size or "debug", dim=None if size else dim,
                        n_layer=None if size else n_layer, n_head=None if size else n_head,
                        n_kv_head=None if n_kv_head == n_head else n_kv_head, head="token",
                        order=OrderConfig("raster"), class_condition=ClassConditionConfig(tokens=1), rope_base=10000.0, cond_rope="zero",
                        pos_embed="none")
    model.validate()
    names = class_names or [f"class {i}" for i in range(classes)]
    if len(names) != classes:
        raise ConfigError(f"{len(names)} class names for {classes} classes")
    return GeneratorSpec(model=model, vocab_size=vocab, grid_h=grid, grid_w=grid,
                         num_classes=classes, class_names=names, resolution=image_size)


def infer_vq_config(shapes: dict, l2_norm: bool = True, source: str = "the checkpoint") -> VQConfig:
    """The VQConfig of a LlamaGen VQ model from its {key: shape} table."""
    need = ["encoder.conv_in.weight", "encoder.conv_out.weight", "quantize.embedding.weight"]
    if any(k not in shapes for k in need):
        raise ValueError(f"{source}: not a LlamaGen VQ state dict: missing "
                         f"{[k for k in need if k not in shapes]}")
    ch = shapes["encoder.conv_in.weight"][0]
    levels = 1 + max(int(m.group(1)) for k in shapes
                     if (m := re.match(r"encoder\.conv_blocks\.(\d+)\.", k)))
    mult = [shapes[f"encoder.conv_blocks.{i}.res.0.conv1.weight"][0] // ch for i in range(levels)]
    res = 1 + max(int(m.group(1)) for k in shapes
                  if (m := re.match(r"encoder\.conv_blocks\.0\.res\.(\d+)\.", k)))
    n, dim = shapes["quantize.embedding.weight"]
    cfg = VQConfig(codebook_size=n, codebook_dim=dim, ch=ch, ch_mult=mult, num_res_blocks=res,
                   z_channels=shapes["encoder.conv_out.weight"][0], l2_norm=l2_norm)
    cfg.validate()
    return cfg


##################################################################################
#                                 Converters                                     #
##################################################################################

@dataclass
class GPTConvertConfig:
    ckpt: str = "???"  # LlamaGen GPT checkpoint: a .pt/.pth file, or a folder holding consolidated.pth
    out: str = "???"  # argen generator weights (.safetensors) to write
    image_size: int = 0  # pixels per side the checkpoint was trained at (256 or 384); required
    downsample: int = 0  # pixels per code; 0: the tokenizer's, or 16 (VQ-16) without tokenizer
    tokenizer: str = ""  # converted tokenizer weights (from `vq`); its path and sha256 go into the spec
    layout: str = "auto"  # auto | ddp ("model") | fsdp (raw state dict) | deepspeed ("module")
    use_ema: bool = False  # ddp: convert the "ema" weights (LlamaGen's own sampler uses "model")
    n_head: int = 0  # attention heads; 0: LlamaGen's size table by (width, depth); other sizes need it
    num_classes: int = 0  # 0: the file's training args, else class-table rows - 1 if that is 1000
    class_names: str = ""  # text file with one class name per line; empty: "class 0", "class 1", ...

    def validate(self) -> None:
        check_fields(self, "", {"layout": LAYOUTS, "image_size": ">= 0", "downsample": ">= 0",
                                "n_head": ">= 0", "num_classes": ">= 0"})


@dataclass
class VQConvertConfig:
    ckpt: str = "???"  # LlamaGen VQ checkpoint (vq_ds16_c2i.pt)
    out: str = "???"  # argen tokenizer weights (.safetensors) to write
    layout: str = "auto"  # auto | ddp ("model") | fsdp (raw state dict) | deepspeed ("module")
    use_ema: bool = False  # ddp: convert the "ema" weights
    l2_norm: bool = True  # l2-normalised codebook (LlamaGen VQ-16: true; not visible in the shapes)

    def validate(self) -> None:
        check_fields(self, "", {"layout": LAYOUTS})


def _source(path: Path, layout: str, entry, dropped) -> dict:
    return {"project": "FoundationVision/LlamaGen", "file": path.name, "sha256": sha256_file(path),
            "layout": layout, "entry": entry, "dropped": sorted(dropped), "converter": __name__}


def _tokenizer_facts(path: str) -> tuple[int, int]:
    """(codebook size, downsample) of converted tokenizer weights, without reading the tensors."""
    cfg = read_tokenizer_config(path)
    with torch.device("meta"):
        tok = build_tokenizer(cfg)
    return tok.codebook_size, tok.downsample


def _class_names(path: str) -> list[str] | None:
    if not path:
        return None
    if not Path(path).is_file():
        raise FileNotFoundError(f"class_names file {path} not found")
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def convert_gpt(cfg: GPTConvertConfig, reuse: bool = False) -> Path:
    """Write argen generator weights for a LlamaGen c2i GPT; `reuse` keeps an up-to-date `out`."""
    log = get_logger("convert")
    obj, path = load_foreign(cfg.ckpt, "llamagen-gpt")
    state, layout, entry = select_state(obj, path, cfg.layout, cfg.use_ema)
    mapped, dropped = split_keys(state, GPT_KEYS, GPT_DERIVED, str(path))
    downsample = cfg.downsample
    if cfg.tokenizer:
        codebook, tok_down = _tokenizer_facts(cfg.tokenizer)
        if downsample and downsample != tok_down:
            raise ConfigError(f"downsample={downsample} but tokenizer {cfg.tokenizer} downsamples "
                              f"by {tok_down}")
        downsample = tok_down
    spec = infer_gpt_spec({k: tuple(v.shape) for k, v in state.items()}, cfg.image_size,
                          downsample or 16, cfg.n_head, cfg.num_classes, _class_names(cfg.class_names),
                          checkpoint_args(obj), str(path))
    if cfg.tokenizer:
        if codebook != spec.vocab_size:
            raise ValueError(f"{path} predicts {spec.vocab_size} codes but tokenizer {cfg.tokenizer} "
                             f"has {codebook}; convert the tokenizer the GPT was trained with")
        spec.tokenizer_path = str(Path(cfg.tokenizer).resolve())
        spec.tokenizer_sha256 = sha256_file(cfg.tokenizer)
    else:
        log.warning("no tokenizer= given: sample.py will need tokenizer=PATH for these weights")
    source = _source(path, layout, entry, dropped)
    if reuse and up_to_date(Path(cfg.out), to_yaml(spec), source):
        log.info(f"{cfg.out} is up to date with {path}")
        return Path(cfg.out)
    model = load_converted(lambda: ARModel(spec), mapped, str(path),
                           lambda k: argen_to_llamagen([k])[k])
    model.reset_buffers("cpu")
    if "freqs_cis" in dropped:  # a stored rotary table tells the grid it was trained at
        theirs = dropped["freqs_cis"].float()
        if theirs.shape != model.rope.shape or not torch.allclose(theirs, model.rope, atol=1e-4):
            raise ValueError(f"{path}: its freqs_cis {tuple(theirs.shape)} does not match the rotary "
                             f"table for image_size={cfg.image_size} / downsample={downsample or 16} "
                             f"{tuple(model.rope.shape)}; pass the resolution it was trained at")
    out = save_weights(cfg.out, model.state_dict(), GENERATOR_KIND, to_yaml(spec),
                       extra={"source": json.dumps(source)})
    a = model.transformer.args
    known = LLAMAGEN_SIZES.get((a.dim, a.n_layer), ("custom size",))[0]
    log.info(f"{path.name} ({layout}{'/' + entry if entry else ''}) -> {out}: {known} as "
             f"size={spec.model.size}{'' if spec.model.dim is None else ' + dim/n_layer/n_head'}, "
             f"width {a.dim}, {a.n_layer} layers, {a.n_head} heads, {spec.num_classes} classes, "
             f"{spec.grid_h}x{spec.grid_w} codes of {spec.vocab_size}"
             + (f"; dropped {sorted(dropped)}" if dropped else ""))
    return out


def convert_vq(cfg: VQConvertConfig, reuse: bool = False) -> Path:
    """Write argen tokenizer weights for a LlamaGen VQ model; `reuse` keeps an up-to-date `out`."""
    log = get_logger("convert")
    obj, path = load_foreign(cfg.ckpt, "llamagen-vq")
    state, layout, entry = select_state(obj, path, cfg.layout, cfg.use_ema)
    mapped, dropped = split_keys(state, None, VQ_DERIVED, str(path))
    vq_cfg = infer_vq_config({k: tuple(v.shape) for k, v in state.items()}, cfg.l2_norm, str(path))
    source = _source(path, layout, entry, dropped)
    if reuse and up_to_date(Path(cfg.out), to_yaml(vq_cfg), source):
        log.info(f"{cfg.out} is up to date with {path}")
        return Path(cfg.out)
    model = load_converted(lambda: VQModel(vq_cfg), mapped, str(path))
    out = save_weights(cfg.out, model.state_dict(), WEIGHTS_KIND, to_yaml(vq_cfg),
                       extra={"source": json.dumps(source)})
    log.info(f"{path.name} ({layout}) -> {out}: codebook {vq_cfg.codebook_size} x "
             f"{vq_cfg.codebook_dim}, downsample {model.downsample}, ch {vq_cfg.ch} x {vq_cfg.ch_mult}")
    return out


COMMANDS = {"gpt": (GPTConvertConfig, convert_gpt), "vq": (VQConvertConfig, convert_vq)}


def main(argv: list[str] | None = None) -> Path:
    return run_commands(COMMANDS, __doc__, argv)  # any error: one line naming what to fix


if __name__ == "__main__":
    main()
