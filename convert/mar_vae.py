"""Convert MAR's KL-16 VAE checkpoint (LTH14/mar `kl16.ckpt`; xAR ships the same file) into
argen tokenizer weights.

    python -m convert.mar_vae pretrained_models/vae/kl16.ckpt weights/mar/kl16.safetensors
    python -m convert.mar_vae ckpt=... out=... latent_scale=0.2325      (the same, as keys)

The checkpoint is `{"model": state_dict}` (MAR's AutoencoderKL.init_from_ckpt reads ["model"]),
read with torch.load(weights_only=True). Its architecture is read from the tensor shapes: the
level widths, res blocks per level, latent channels, and which levels have attention. Every key
is renamed by the explicit table `key_table(cfg)` into diffusers' AutoencoderKL names, which
tokenizer/kl.py uses; MAR's 1x1 attention convs (C, C, 1, 1) become diffusers' Linear weights
(C, C). A key the table does not know, or one the architecture lacks, is an error that names it.
The output is argen tokenizer weights (KLConfig with latent_scale 0.2325, MAR's value: its
generators train on posterior samples * 0.2325 and decode tokens / 0.2325).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from common.config import check_fields, to_yaml
from common.dist import get_logger
from common.io import save_weights, sha256_file
from convert.common import (LAYOUTS, load_converted, load_foreign, run_converter, select_state,
                            split_keys, up_to_date)
from tokenizer import WEIGHTS_KIND
from tokenizer.kl import KLConfig, KLModel

##################################################################################
#                                  Key tables                                    #
##################################################################################

# inside a res block and an attention block: MAR (LDM) name -> diffusers name
RES_BLOCK = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
             "nin_shortcut": "conv_shortcut"}
ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# modules outside the levels
TOP = {"encoder.conv_in": "encoder.conv_in", "encoder.norm_out": "encoder.conv_norm_out",
       "encoder.conv_out": "encoder.conv_out", "decoder.conv_in": "decoder.conv_in",
       "decoder.norm_out": "decoder.conv_norm_out", "decoder.conv_out": "decoder.conv_out",
       "quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
# diffusers keeps attention projections as Linear layers; MAR as 1x1 convs
_LINEAR = re.compile(r"attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")
MAR_SCALE = 0.2325  # MAR/xAR: posterior.sample() * 0.2325 for training, tokens / 0.2325 to decode


def _params(table: dict, src: str, dst: str, modules: dict) -> None:
    """weight and bias of every sub-module in `modules` (MAR name -> diffusers name)."""
    for a, b in modules.items():
        for p in ("weight", "bias"):
            table[f"{src}.{a}.{p}" if src else f"{a}.{p}"] = f"{dst}.{b}.{p}" if dst else f"{b}.{p}"


def _res(table: dict, src: str, dst: str, c_in: int, c_out: int) -> None:
    # the 1x1 shortcut exists only where the block changes width
    modules = {k: v for k, v in RES_BLOCK.items() if k != "nin_shortcut" or c_in != c_out}
    _params(table, src, dst, modules)


def key_table(cfg: KLConfig) -> dict[str, str]:
    """MAR state-dict name -> argen (diffusers AutoencoderKL) name, for the architecture `cfg`."""
    table: dict[str, str] = {}
    _params(table, "", "", TOP)
    widths, n, blocks = cfg.block_out_channels, len(cfg.block_out_channels), cfg.layers_per_block
    c = widths[0]
    for i, w in enumerate(widths):  # encoder levels, full resolution first
        src, dst = f"encoder.down.{i}", f"encoder.down_blocks.{i}"
        for j in range(blocks):
            _res(table, f"{src}.block.{j}", f"{dst}.resnets.{j}", c, w)
            c = w
            if i in cfg.encoder_attention:
                _params(table, f"{src}.attn.{j}", f"{dst}.attentions.{j}", ATTENTION)
        if i < n - 1:
            _params(table, f"{src}.downsample", f"{dst}.downsamplers.0", {"conv": "conv"})
    for part in ("encoder", "decoder"):
        _res(table, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", widths[-1], widths[-1])
        _res(table, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", widths[-1], widths[-1])
        if cfg.mid_attention:
            _params(table, f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", ATTENTION)
    c = widths[-1]
    for i in reversed(range(n)):  # MAR's up.{i} is level i; diffusers lists them lowest first
        src, dst = f"decoder.up.{i}", f"decoder.up_blocks.{n - 1 - i}"
        for j in range(blocks + 1):
            _res(table, f"{src}.block.{j}", f"{dst}.resnets.{j}", c, widths[i])
            c = widths[i]
            if i in cfg.decoder_attention:
                _params(table, f"{src}.attn.{j}", f"{dst}.attentions.{j}", ATTENTION)
        if i > 0:
            _params(table, f"{src}.upsample", f"{dst}.upsamplers.0", {"conv": "conv"})
    return table


##################################################################################
#                          Architecture from shapes                              #
##################################################################################

def _indices(shapes: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in shapes if (m := re.match(pattern, k))})


def infer_config(shapes: dict, source: str, latent_scale: float = MAR_SCALE) -> KLConfig:
    """The KLConfig of a MAR KL VAE from its {key: shape} table."""
    if any(k.startswith("quantize.") for k in shapes):  # a VQ whose family load_foreign missed
        raise ValueError(f"{source}: this is a VQ tokenizer checkpoint (it has "
                         f"{next(k for k in shapes if k.startswith('quantize.'))}), not MAR's KL VAE; "
                         f"a LlamaGen VQ converts with `python -m convert.llamagen vq`, a VAR VQVAE "
                         f"with `python -m convert.var vqvae`")
    need = ["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "quant_conv.weight",
            "post_quant_conv.weight", "decoder.conv_out.weight"]
    missing = [k for k in need if k not in shapes]
    if missing:
        raise ValueError(f"{source}: not a MAR KL VAE state dict (LTH14/mar models/vae.py): missing "
                         f"{missing}; its keys start {sorted(shapes)[:6]}")
    levels = _indices(shapes, r"encoder\.down\.(\d+)\.")
    widths = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0] for i in levels]
    blocks = len(_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\."))
    latent = shapes["post_quant_conv.weight"][0]
    if shapes["quant_conv.weight"][0] != 2 * latent:
        raise ValueError(f"{source}: quant_conv has {shapes['quant_conv.weight'][0]} outputs for "
                         f"{latent} latent channels; a KL VAE has twice as many (mean and logvar)")
    cfg = KLConfig(block_out_channels=widths, layers_per_block=blocks, latent_channels=latent,
                   norm_num_groups=32,  # GroupNorm(32) throughout LDM/MAR; not visible in shapes
                   encoder_attention=_indices(shapes, r"encoder\.down\.(\d+)\.attn\."),
                   decoder_attention=_indices(shapes, r"decoder\.up\.(\d+)\.attn\."),
                   mid_attention="encoder.mid.attn_1.norm.weight" in shapes,
                   latent_scale=latent_scale)
    cfg.validate()
    return cfg


##################################################################################
#                                 Converter                                      #
##################################################################################

@dataclass
class MarVAEConvertConfig:
    ckpt: str = "???"  # MAR KL VAE checkpoint (kl16.ckpt): {"model": state_dict}
    out: str = "???"  # argen tokenizer weights (.safetensors) to write
    layout: str = "auto"  # auto | ddp ("model", MAR's) | fsdp (a raw state dict) | deepspeed ("module")
    latent_scale: float = MAR_SCALE  # stored in the config; MAR's generators use 0.2325

    def validate(self) -> None:
        check_fields(self, "", {"layout": LAYOUTS, "latent_scale": "> 0"})


def map_state(state: dict, table: dict[str, str], source: str) -> dict[str, torch.Tensor]:
    """Rename by the table (unknown keys fail), in float32, with the attention's 1x1 convs
    reshaped into Linear weights."""
    mapped, _ = split_keys(state, table, (), source, project="MAR KL VAE")
    return {k: (v.flatten(1) if _LINEAR.search(k) and v.dim() == 4 else v).float()
            for k, v in mapped.items()}


def convert(cfg: MarVAEConvertConfig, reuse: bool = False) -> Path:
    """Write argen tokenizer weights for a MAR KL VAE; `reuse` keeps an up-to-date `out`."""
    log = get_logger("convert")
    obj, path = load_foreign(cfg.ckpt, "mar-vae")
    state, layout, entry = select_state(obj, path, cfg.layout)
    kl_cfg = infer_config({k: tuple(v.shape) for k, v in state.items()}, str(path), cfg.latent_scale)
    source = {"project": "LTH14/mar", "file": path.name, "sha256": sha256_file(path),
              "layout": layout, "entry": entry, "converter": __name__}
    if reuse and up_to_date(Path(cfg.out), to_yaml(kl_cfg), source):
        log.info(f"{cfg.out} is up to date with {path}")
        return Path(cfg.out)
    table = key_table(kl_cfg)
    mapped = map_state(state, table, str(path))
    inverse = {v: k for k, v in table.items()}
    model = load_converted(lambda: KLModel(kl_cfg), mapped, str(path), lambda k: inverse.get(k, k))
    out = save_weights(cfg.out, model.state_dict(), WEIGHTS_KIND, to_yaml(kl_cfg),
                       extra={"source": json.dumps(source)})
    log.info(f"{path.name} ({layout}) -> {out}: {len(mapped)} tensors, widths "
             f"{kl_cfg.block_out_channels}, {kl_cfg.latent_channels} latent channels, downsample "
             f"{model.downsample}, latent_scale {kl_cfg.latent_scale}")
    return out


def main(argv: list[str] | None = None) -> Path:
    return run_converter(convert, MarVAEConvertConfig, __doc__, argv)


if __name__ == "__main__":
    main()
