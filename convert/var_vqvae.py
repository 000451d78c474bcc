"""VAR's multi-scale VQVAE (vae_ch160v4096z32.pth) -> argen tokenizer weights; the command is
`python -m convert.var vqvae` (convert/var.py).

VAR saves a raw state dict (its demo calls load_state_dict(torch.load(ckpt)) on the file), read
with torch.load(weights_only=True). The architecture is read from the tensor shapes: base width
and channel multipliers from the encoder's convs, res blocks per level, codebook size and code
dim, and the phi convolutions (their count and VAR's layout: `quant_resi.qresi` one shared,
`quant_resi.{k}` one per scale, `quant_resi.qresi_ls.{k}` K spread over the scales). Not in the
shapes: the scale schedule (default the release's 256px one) and quant_resi (0.5). Every key is
renamed by the explicit table `vqvae_key_table(cfg)`; the encoder/decoder names are VAR's own,
the phi convs become `quantize.phi.{k}`. The persistent buffer `quantize.ema_vocab_hit_SV`
(S, V), an EMA of code hits per scale kept for training only, is dropped after checking that its
S equals the schedule's scale count (the phi used at each scale depends on that count).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.config import check_fields, to_yaml
from common.dist import get_logger
from common.io import save_weights, sha256_file
from convert.common import load_converted, load_foreign, split_keys, up_to_date
from tokenizer import WEIGHTS_KIND
from tokenizer.msvq import RELEASE_PATCH_NUMS, MSVQConfig, MSVQModel

##################################################################################
#                                  Key tables                                    #
##################################################################################

VQVAE_DERIVED = "quantize.ema_vocab_hit_SV"  # training statistic (S, V); checked, then dropped
RES_BLOCK = ("norm1", "conv1", "norm2", "conv2")  # + nin_shortcut where the width changes
ATTENTION = ("norm", "qkv", "proj_out")


def _params(table: dict, prefix: str, modules, dst_prefix: str | None = None) -> None:
    """weight and bias of each module under `prefix` (argen name: the same, or under dst_prefix)."""
    for m in modules:
        for p in ("weight", "bias"):
            table[f"{prefix}.{m}.{p}"] = f"{dst_prefix or prefix}.{m}.{p}"


def _res(table: dict, prefix: str, c_in: int, c_out: int) -> None:
    _params(table, prefix, RES_BLOCK + (("nin_shortcut",) if c_in != c_out else ()))


def vqvae_key_table(cfg: MSVQConfig) -> dict[str, str]:
    """VAR VQVAE state-dict name -> argen MSVQModel name, for the architecture `cfg`."""
    table: dict[str, str] = {}
    ch, mults, n, blocks = cfg.ch, cfg.ch_mult, len(cfg.ch_mult), cfg.num_res_blocks
    _params(table, "encoder", ("conv_in", "norm_out", "conv_out"))
    _params(table, "decoder", ("conv_in", "norm_out", "conv_out"))
    for part in ("encoder", "decoder"):
        _res(table, f"{part}.mid.block_1", 1, 1)
        _params(table, f"{part}.mid.attn_1", ATTENTION)
        _res(table, f"{part}.mid.block_2", 1, 1)
    c = ch
    for i, m in enumerate(mults):  # encoder levels, full resolution first
        for j in range(blocks):
            _res(table, f"encoder.down.{i}.block.{j}", c, ch * m)
            c = ch * m
            if i == n - 1:
                _params(table, f"encoder.down.{i}.attn.{j}", ATTENTION)
        if i != n - 1:
            _params(table, f"encoder.down.{i}.downsample", ("conv",))
    for i in reversed(range(n)):  # decoder levels, lowest resolution first; up.{i} is level i
        for j in range(blocks + 1):
            _res(table, f"decoder.up.{i}.block.{j}", c, ch * mults[i])
            c = ch * mults[i]
            if i == n - 1:
                _params(table, f"decoder.up.{i}.attn.{j}", ATTENTION)
        if i != 0:
            _params(table, f"decoder.up.{i}.upsample", ("conv",))
    for name in ("quant_conv", "post_quant_conv"):
        for p in ("weight", "bias"):
            table[f"{name}.{p}"] = f"{name}.{p}"
    table["quantize.embedding.weight"] = "quantize.embedding.weight"
    table.update(_phi_keys(cfg))
    return table


def _phi_keys(cfg: MSVQConfig) -> dict[str, str]:
    """VAR keeps the phi convs as PhiShared (`qresi`), PhiNonShared (a list) or
    PhiPartiallyShared (`qresi_ls`), by share_quant_resi 1, 0, K; argen as one list."""
    if abs(cfg.quant_resi) <= 1e-6:  # VAR's phi is the identity then: no parameters
        return {}
    if cfg.share_quant_resi == 1:
        src = ["quantize.quant_resi.qresi"]
    elif cfg.share_quant_resi == 0:
        src = [f"quantize.quant_resi.{k}" for k in range(len(cfg.patch_nums))]
    else:
        src = [f"quantize.quant_resi.qresi_ls.{k}" for k in range(cfg.share_quant_resi)]
    return {f"{s}.{p}": f"quantize.phi.{k}.{p}" for k, s in enumerate(src) for p in ("weight", "bias")}


##################################################################################
#                          Architecture from shapes                              #
##################################################################################

def _indices(shapes: dict, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in shapes if (m := re.match(pattern, k))})


def infer_vqvae_config(shapes: dict, source: str, patch_nums=None, quant_resi: float = 0.5) -> MSVQConfig:
    """The MSVQConfig of a VAR VQVAE from its {key: shape} table."""
    need = ["encoder.conv_in.weight", "encoder.down.0.block.0.conv1.weight", "quant_conv.weight",
            "quantize.embedding.weight", "decoder.conv_out.weight"]
    if any(k not in shapes for k in need):  # (another family's checkpoint: load_foreign names it)
        raise ValueError(f"{source}: not a VAR VQVAE state dict (FoundationVision/VAR "
                         f"models/vqvae.py): missing {[k for k in need if k not in shapes]}; its "
                         f"keys start {sorted(shapes)[:5]}")
    ch = shapes["encoder.conv_in.weight"][0]
    widths = [shapes[f"encoder.down.{i}.block.0.conv1.weight"][0]
              for i in _indices(shapes, r"encoder\.down\.(\d+)\.")]
    if any(w % ch for w in widths):
        raise ValueError(f"{source}: encoder level widths {widths} are not multiples of the base width {ch}")
    size, dim = shapes["quantize.embedding.weight"]
    patch_nums = list(RELEASE_PATCH_NUMS if patch_nums is None else patch_nums)
    if "quantize.quant_resi.qresi.weight" in shapes:
        share = 1
    elif (shared := _indices(shapes, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.")):
        share = len(shared)
    elif (per_scale := _indices(shapes, r"quantize\.quant_resi\.(\d+)\.")):
        share = 0
        if len(per_scale) != len(patch_nums):
            raise ValueError(f"{source}: {len(per_scale)} per-scale phi convs (quant_resi.{{k}}) "
                             f"for a schedule of {len(patch_nums)} scales {patch_nums}; pass "
                             f"patch_nums= with {len(per_scale)} scales")
    elif quant_resi:
        raise ValueError(f"{source}: no phi convolutions (quantize.quant_resi.*); a VQVAE trained "
                         f"with quant_resi 0 (phi = identity) converts with quant_resi=0")
    else:
        share = 4  # unused: quant_resi 0 has no phi convs
    cfg = MSVQConfig(codebook_size=size, codebook_dim=dim, ch=ch, ch_mult=[w // ch for w in widths],
                     num_res_blocks=len(_indices(shapes, r"encoder\.down\.0\.block\.(\d+)\.")),
                     patch_nums=patch_nums, quant_resi=quant_resi, share_quant_resi=share)
    cfg.validate()
    if VQVAE_DERIVED in shapes and shapes[VQVAE_DERIVED][0] != len(patch_nums):
        trained = shapes[VQVAE_DERIVED][0]
        raise ValueError(f"{source}: trained with {trained} scales ({VQVAE_DERIVED} has {trained} "
                         f"rows), but patch_nums={patch_nums} has {len(patch_nums)}; the phi conv "
                         f"of each scale depends on the count: pass patch_nums= with {trained} "
                         f"scales (256px release: {RELEASE_PATCH_NUMS})")
    return cfg


##################################################################################
#                                 Converters                                     #
##################################################################################

@dataclass
class VQVAEConvertConfig:
    ckpt: str = "???"  # VAR VQVAE checkpoint (vae_ch160v4096z32.pth): a raw state dict
    out: str = "???"  # argen tokenizer weights (.safetensors) to write
    patch_nums: list[int] = field(default_factory=lambda: list(RELEASE_PATCH_NUMS))  # scale schedule (not in the shapes); last = image side / 16
    quant_resi: float = 0.5  # phi's residual ratio (not in the shapes; every VAR release: 0.5)

    def validate(self) -> None:
        check_fields(self, "", {"quant_resi": "[0, 1]"})


def _raw_state(obj, path: Path) -> dict:
    """VAR's raw state dict (VAR saves the state dict itself, not wrapped in {"model": ...})."""
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    bad = sorted(k for k, v in obj.items() if not torch.is_tensor(v))
    if bad:
        raise ValueError(f"{path}: not VAR's raw state dict: top-level entries {bad[:6]} are not "
                         f"tensors; VAR's releases are the state dict itself")
    return dict(obj)


def convert_vqvae(cfg: VQVAEConvertConfig, reuse: bool = False) -> Path:
    """Write argen tokenizer weights for a VAR VQVAE; `reuse` keeps an up-to-date `out`."""
    log = get_logger("convert")
    obj, path = load_foreign(cfg.ckpt, "var-vqvae")
    state = _raw_state(obj, path)
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    ms_cfg = infer_vqvae_config(shapes, str(path), cfg.patch_nums, cfg.quant_resi)
    source = {"project": "FoundationVision/VAR", "file": path.name, "sha256": sha256_file(path),
              "layout": "raw", "dropped": [VQVAE_DERIVED] if VQVAE_DERIVED in state else [],
              "converter": __name__}
    if reuse and up_to_date(Path(cfg.out), to_yaml(ms_cfg), source):
        log.info(f"{cfg.out} is up to date with {path}")
        return Path(cfg.out)
    table = vqvae_key_table(ms_cfg)
    mapped, _ = split_keys(state, table, (VQVAE_DERIVED,), str(path), project="VAR VQVAE")
    mapped = {k: v.float() for k, v in mapped.items()}
    inverse = {v: k for k, v in table.items()}
    model = load_converted(lambda: MSVQModel(ms_cfg), mapped, str(path), lambda k: inverse.get(k, k))
    out = save_weights(cfg.out, model.state_dict(), WEIGHTS_KIND, to_yaml(ms_cfg),
                       extra={"source": json.dumps(source)})
    log.info(f"{path.name} -> {out}: {len(mapped)} tensors, codebook {ms_cfg.codebook_size} x "
             f"{ms_cfg.codebook_dim}, ch {ms_cfg.ch} x {ms_cfg.ch_mult}, {len(model.quantize.phi)} "
             f"phi convs, scales {ms_cfg.patch_nums}")
    return out
