"""Next-scale (VAR) sampling speed against a raster next-token model of the same width and
depth, side by side in one run, on random weights. Prints a table (steps, tokens, images/s);
not a test.

    python bench/scale_speed.py                    # CPU: the scale quickstart's model and codes
    python bench/scale_speed.py size=VAR-d16 dim=null n_layer=null n_head=null grid=16 vocab=4096 \
        code_dim=32 scales=[1,2,3,4,5,6,8,10,13,16] batch_sizes=[1,64] precision=bf16 compile=true
                                                   # GPU: VAR-d16 as released, 256 px

Both models have VAR's block (LayerNorm without affine, adaLN from the class vector, GELU(tanh)
MLP 4d, l2-normalised attention) and decode with the KV cache and CFG (doubled rows). The raster
model feeds one token per step over the finest grid (h*w steps); the next-scale model one scale
per step (len(scales) steps) over more tokens in all (the sum of the scales' squares), whose
inputs the frozen quantiser rebuilds between steps (a few small convolutions). VAR reports its
d16-d30 about 20x faster than an AR baseline at 256 px; this measures the two loops here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ar.conditioning import ClassCondition  # noqa: E402
from ar.config import GeneratorSpec, ModelConfig, MultiScaleSpec, transformer_args  # noqa: E402
from ar.inputs import InputsConfig  # noqa: E402
from ar.model import ARModel  # noqa: E402
from ar.orders import OrderConfig  # noqa: E402
from bench.report import device_label, print_table, seconds_per_call  # noqa: E402
from common import precision  # noqa: E402
from common.config import parse_cli  # noqa: E402
from common.dist import pick_device  # noqa: E402
from convert.var_transformer import var_model_config  # noqa: E402
from sampling.context import compiled_extend  # noqa: E402
from sampling.generate import generate  # noqa: E402
from sampling.settings import SamplingConfig  # noqa: E402


@dataclass
class ScaleBenchConfig:
    size: str = "AR-Nano"  # width/depth/heads from the registry (VAR-d16 on a GPU)
    dim: Optional[int] = 192  # override the size's width (the scale quickstart's: 4 layers x 192)
    n_layer: Optional[int] = 4  # override the size's depth
    n_head: Optional[int] = 6  # override the size's heads
    grid: int = 8  # finest grid side (8: the scale quickstart's; 16: VAR at 256 px)
    scales: List[int] = field(default_factory=lambda: [1, 2, 4, 8])  # the scale schedule (last = grid; the quickstart's)
    vocab: int = 256  # codebook size (the quickstart's; VAR's 4096)
    code_dim: int = 8  # code vector channels (the quickstart's; VAR's Cvae 32)
    batch_sizes: List[int] = field(default_factory=lambda: [1, 64])  # images per batch
    cfg_scale: float = 2.5  # guidance (VAR's 1.5 on its ramp); != 1 doubles the rows
    top_k: int = 900  # VAR's FID setting
    top_p: float = 0.96
    repeats: int = 1  # timed repetitions (after one warm-up)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 where native) | bf16 | fp32
    compile: bool = False  # CUDA graphs for the decode step (GPU)
    threads: int = 0  # CPU threads (0: torch default)


def models(cfg: ScaleBenchConfig) -> dict[str, ModelConfig]:
    """The registry size with VAR's switches, as next-scale and as raster next-token."""
    a = transformer_args(ModelConfig(size=cfg.size, dim=cfg.dim, n_layer=cfg.n_layer, n_head=cfg.n_head))
    scale = var_model_config(a.dim, a.n_layer, a.n_head, 4 * a.dim, cfg.scales[0] ** 2)
    raster = var_model_config(a.dim, a.n_layer, a.n_head, 4 * a.dim, 1)
    raster.order, raster.inputs, raster.level_embed = OrderConfig("raster"), InputsConfig("auto"), False
    raster.class_condition.prefix = "table"
    return {"next-scale": scale, "raster": raster}


def main(cfg: ScaleBenchConfig) -> list[dict]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    dtype = torch.bfloat16 if precision.use_bf16(cfg.precision, device) else torch.float32
    settings = SamplingConfig(cfg_scale=cfg.cfg_scale, cfg_schedule="linear_full", top_k=cfg.top_k,
                              top_p=cfg.top_p)
    extend_fn = compiled_extend() if cfg.compile else None
    rows = []
    for name, m in models(cfg).items():
        spec = GeneratorSpec(model=m, vocab_size=cfg.vocab, grid_h=cfg.grid, grid_w=cfg.grid, num_classes=1000,
                             multiscale=MultiScaleSpec(patch_nums=cfg.scales, code_dim=cfg.code_dim))
        torch.manual_seed(0)
        model = ARModel(spec).to(device, dtype).eval()
        print(f"# {name}: {model.order}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
              f"cfg {cfg.cfg_scale}, {str(dtype).split('.')[-1]}, {device} ({device_label(device)})")
        for batch in cfg.batch_sizes:
            seconds = time_batch(model, batch, settings, device, cfg.repeats, extend_fn)
            rows.append({"model": name, "steps": model.order.num_steps, "tokens": model.num_tokens,
                         "batch": batch, "sec_per_batch": seconds, "images_per_s": batch / seconds})
    for r in rows:
        raster = next(x for x in rows if x["model"] == "raster" and x["batch"] == r["batch"])
        r["speedup"] = r["images_per_s"] / raster["images_per_s"]
    print_table(rows, [("model", 10, "model", ""), ("steps", 5, "steps", "d"), ("tokens", 6, "tokens", "d"),
                       ("batch", 5, "batch", "d"), ("s/batch", 9, "sec_per_batch", ".3f"),
                       ("images/s", 9, "images_per_s", ".2f"), ("x raster", 8, "speedup", ".1f")])
    return rows


@torch.no_grad()
def time_batch(model, batch: int, settings, device, repeats: int, extend_fn) -> float:
    cond = ClassCondition(torch.arange(batch, device=device) % 1000)
    ids = torch.arange(batch, device=device)
    return seconds_per_call(lambda: generate(model, cond, ids, 0, settings, extend_fn), device, repeats)


if __name__ == "__main__":
    main(parse_cli(ScaleBenchConfig, sys.argv[1:], __doc__))
