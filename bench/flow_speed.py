"""Flow-model sampling speed against flow steps and cell size, side by side in one run, on
random weights with xAR's backbone switches. Prints a table (network calls per image,
images/s); not a test.

    python bench/flow_speed.py                     # CPU: AR-Nano on the quickstart's 8x8 latents
    python bench/flow_speed.py size=xAR-B grid=16 cells=[8] steps=[40] batch_sizes=[1,128] \
        precision=bf16                             # GPU: xAR-B as released, xAR's own figure

Each step of the order (a k x k cell) integrates `steps` network calls over its k^2 tokens
against the KV cache; the first call of a cell also feeds the previous cell clean. So calls
per image = cells x steps, and a call's cost grows with k^2 (tokens fed) and with the cache.
xAR reports 9.8 images/s for xAR-B at batch 128 on one A100 (40 SDE steps, 4 cells of 8 x 8,
cfg on); on CPUs this bench uses a smaller width so the table finishes in minutes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ar.conditioning import ClassCondition, ClassConditionConfig  # noqa: E402
from ar.config import BackboneConfig, GeneratorSpec, ModelConfig, transformer_args  # noqa: E402
from ar.model import ARModel  # noqa: E402
from ar.orders import OrderConfig  # noqa: E402
from bench.report import device_label, print_table, seconds_per_call  # noqa: E402
from common import precision  # noqa: E402
from common.config import parse_cli  # noqa: E402
from common.dist import pick_device  # noqa: E402
from sampling.flow import generate_flow  # noqa: E402
from sampling.settings import SamplingConfig  # noqa: E402


@dataclass
class FlowBenchConfig:
    size: str = "AR-Nano"  # width/depth/heads from the registry (xAR-B on a GPU)
    grid: int = 8  # latent grid side (8: the flow quickstart's; 16: KL-16 at 256 px)
    channels: int = 16  # latent channels (KL-16: 16)
    cells: List[int] = field(default_factory=lambda: [2, 4, 8])  # cell sides k (k = grid: the whole image)
    steps: List[int] = field(default_factory=lambda: [10, 20, 40])  # flow steps per cell
    batch_sizes: List[int] = field(default_factory=lambda: [1, 64])  # images per batch
    sampler: str = "sde"  # sde | ode
    cfg_scale: float = 2.7  # guidance (xAR-B's); != 1 doubles the rows
    repeats: int = 1  # timed repetitions (after one warm-up)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 where native) | bf16 | fp32
    threads: int = 0  # CPU threads (0: torch default)


def xar_like(size: str, grid: int, channels: int, cell: int) -> ModelConfig:
    """The registry size with xAR's switches, as cells of cell x cell tokens."""
    base = transformer_args(ModelConfig(size=size))
    layers, dim = base.n_layer, base.dim
    backbone = BackboneConfig(norm_eps=1e-6, block_norm_affine=False, ffn_gate="gelu",
                              ffn_hidden=int(dim * 8 / 3), bias=True, adaln=True, input_norm=True,
                              split=layers // 2)
    order = OrderConfig("whole") if cell == grid else OrderConfig("cell", cell=cell)
    return ModelConfig(size=size, head="flow", class_condition=ClassConditionConfig(tokens=0),
                       pos_embed="learned", backbone=backbone, order=order,
                       token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)


def main(cfg: FlowBenchConfig) -> list[dict]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    dtype = torch.bfloat16 if precision.use_bf16(cfg.precision, device) else torch.float32
    rows = []
    for cell in cfg.cells:
        spec = GeneratorSpec(model=xar_like(cfg.size, cfg.grid, cfg.channels, cell),
                             latent_channels=cfg.channels, grid_h=cfg.grid, grid_w=cfg.grid,
                             num_classes=1000)
        torch.manual_seed(0)
        model = ARModel(spec).to(device, dtype).eval()
        print(f"# {cfg.size} {model.order}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"params, {cfg.channels}-channel latents, cfg {cfg.cfg_scale}, {cfg.sampler}, "
              f"{str(dtype).split('.')[-1]}, {device} ({device_label(device)})")
        for steps in cfg.steps:
            settings = SamplingConfig(cfg_scale=cfg.cfg_scale, cfg_schedule="linear_full",
                                      flow_sampler=cfg.sampler, flow_steps=steps)
            for batch in cfg.batch_sizes:
                seconds = time_batch(model, batch, settings, device, cfg.repeats)
                rows.append({"cell": f"{cell}x{cell}", "cells": model.order.num_steps, "steps": steps,
                             "calls": model.order.num_steps * steps, "batch": batch,
                             "sec_per_batch": seconds, "images_per_s": batch / seconds})
    print_table(rows, [("cell", 6, "cell", ""), ("cells", 5, "cells", "d"), ("steps", 5, "steps", "d"),
                       ("calls", 6, "calls", "d"), ("batch", 5, "batch", "d"),
                       ("s/batch", 9, "sec_per_batch", ".3f"), ("images/s", 9, "images_per_s", ".2f")])
    return rows


@torch.no_grad()
def time_batch(model, batch: int, settings, device, repeats: int) -> float:
    cond = ClassCondition(torch.arange(batch, device=device) % 1000)
    ids = torch.arange(batch, device=device)
    return seconds_per_call(lambda: generate_flow(model, cond, ids, 0, settings), device, repeats)


if __name__ == "__main__":
    main(parse_cli(FlowBenchConfig, sys.argv[1:], __doc__))
