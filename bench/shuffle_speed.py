"""Token-Shuffle's speed: training tokens/s and sampling images/s with s = 1, 2, 4 (s x s
tokens fused into one position) on code grids of 32 x 32 and 64 x 64, side by side in one run,
on random weights and codes. Prints a table; not a test.

    python bench/shuffle_speed.py                                   # CPU: the quickstart's width
    python bench/shuffle_speed.py size=AR-B dim=null n_layer=null n_head=null grids=[64] \
        train_batch=8 sample_batch=8 precision=bf16 compile=true     # GPU: AR-B at 1024 px (16x VQ)

s = 1 is the plain next-token model (raster order, no fuse layers); s > 1 is
model.order.name=cell model.order.cell=s model.inputs.name=shuffle with
model.inputs.shuffle_blocks fuse and unshuffle blocks. The sequence is (grid / s)^2 positions:
attention cost falls ~s^4-fold and the per-position work s^2-fold, while the head still scores
every token. Tokens/s counts image tokens (grid^2 per image), so the columns compare what a
user gets for the same data.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ar.conditioning import ClassCondition, TextCondition  # noqa: E402
from ar.config import GeneratorSpec, ModelConfig  # noqa: E402
from ar.inputs import InputsConfig  # noqa: E402
from ar.model import ARModel  # noqa: E402
from ar.optim import make_adamw  # noqa: E402
from ar.orders import OrderConfig  # noqa: E402
from bench.report import device_label, print_table, seconds_per_call  # noqa: E402
from common import precision  # noqa: E402
from common.config import parse_cli  # noqa: E402
from common.dist import pick_device  # noqa: E402
from sampling.context import compiled_extend  # noqa: E402
from sampling.generate import generate  # noqa: E402
from sampling.settings import SamplingConfig  # noqa: E402


@dataclass
class ShuffleBenchConfig:
    size: str = "AR-Nano"  # width/depth/heads from the registry (AR-B on a GPU)
    dim: Optional[int] = 192  # override the size's width (the quickstart's 4 layers x 192)
    n_layer: Optional[int] = 4  # override the size's depth
    n_head: Optional[int] = 6  # override the size's heads
    grids: List[int] = field(default_factory=lambda: [32, 64])  # code-grid sides
    shuffles: List[int] = field(default_factory=lambda: [1, 2, 4])  # window sides s
    shuffle_blocks: int = 2  # fuse / unshuffle residual MLP blocks (Token-Shuffle's n)
    vocab: int = 4096  # codebook size
    train_batch: int = 4  # images per training step
    train_steps: int = 2  # timed training steps (after one warm-up step)
    sample_batch: int = 4  # images per sampling batch (CFG doubles the rows)
    sample_repeats: int = 1  # timed sampling batches (after one warm-up batch)
    sample: bool = True  # also time sampling (the slowest part on a CPU at s = 1, 64 x 64)
    cfg_scale: float = 3.0  # guidance; != 1 doubles the rows
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 where native) | bf16 | fp32
    compile: bool = False  # CUDA graphs for the decode step (GPU)
    threads: int = 0  # CPU threads (0: torch default)


def build(cfg: ShuffleBenchConfig, grid: int, s: int, device, dtype) -> ARModel:
    shuffle = dict(order=OrderConfig("cell", cell=s),
                   inputs=InputsConfig("shuffle", shuffle_blocks=cfg.shuffle_blocks)) if s > 1 else {}
    m = ModelConfig(size=cfg.size, dim=cfg.dim, n_layer=cfg.n_layer, n_head=cfg.n_head,
                    token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, **shuffle)
    spec = GeneratorSpec(model=m, vocab_size=cfg.vocab, grid_h=grid, grid_w=grid, num_classes=1000)
    torch.manual_seed(0)
    return ARModel(spec).to(device, dtype)


def bench_condition(model: ARModel, batch: int, device):
    """Class ids, or for a text model random captions filling its text length."""
    text = model.spec.text
    if not text.kind:
        return ClassCondition(torch.arange(batch, device=device) % 1000)
    if text.kind == "tokens":
        return TextCondition(torch.randint(1, text.vocab_size, (batch, text.max_tokens), device=device))
    return TextCondition(torch.randn(batch, text.max_tokens, text.channels, device=device))


def train_tokens_per_s(model: ARModel, cfg: ShuffleBenchConfig, device, bf16: bool) -> float:
    model.train()
    opt = make_adamw(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, device=device)
    grid = model.spec.grid_h
    codes = torch.randint(0, cfg.vocab, (cfg.train_batch, grid, grid), device=device)
    cond = bench_condition(model, cfg.train_batch, device)

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
            loss = model(codes, cond)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return cfg.train_batch * grid * grid / seconds_per_call(step, device, cfg.train_steps)


@torch.no_grad()
def images_per_s(model: ARModel, cfg: ShuffleBenchConfig, device, extend_fn) -> float:
    model.eval()
    cond = bench_condition(model, cfg.sample_batch, device)
    ids = torch.arange(cfg.sample_batch, device=device)
    settings = SamplingConfig(cfg_scale=cfg.cfg_scale, top_k=0, top_p=1.0)
    seconds = seconds_per_call(lambda: generate(model, cond, ids, 0, settings, extend_fn), device,
                               cfg.sample_repeats)
    model.clear_cache()
    return cfg.sample_batch / seconds


def main(cfg: ShuffleBenchConfig) -> list[dict]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    bf16 = precision.use_bf16(cfg.precision, device)
    extend_fn = compiled_extend() if cfg.compile else None
    print(f"# {cfg.size} (dim {cfg.dim}, {cfg.n_layer} layers), {cfg.vocab} codes, train batch "
          f"{cfg.train_batch}, sample batch {cfg.sample_batch} (cfg {cfg.cfg_scale}), "
          f"{'bf16' if bf16 else 'fp32'}, {device} ({device_label(device)})", flush=True)
    rows = []
    for grid in cfg.grids:
        for s in cfg.shuffles:
            model = build(cfg, grid, s, device, torch.float32)  # autocast for training
            row = {"grid": f"{grid}x{grid}", "s": s, "positions": model.order.num_steps,
                   "params": sum(p.numel() for p in model.parameters()) / 1e6,
                   "train_tok_s": train_tokens_per_s(model, cfg, device, bf16)}
            if cfg.sample:
                model = model.to(torch.bfloat16 if bf16 else torch.float32)
                row["images_s"] = images_per_s(model, cfg, device, extend_fn)
            rows.append(row)
            print(f"  {row}", flush=True)
            del model
    for r in rows:
        base = next(x for x in rows if x["grid"] == r["grid"] and x["s"] == 1)
        r["train_x"] = r["train_tok_s"] / base["train_tok_s"]
        r["sample_x"] = r["images_s"] / base["images_s"] if cfg.sample else float("nan")
    print_table(rows, [("grid", 7, "grid", ""), ("s", 2, "s", "d"), ("positions", 9, "positions", "d"),
                       ("params M", 8, "params", ".2f"), ("train tok/s", 11, "train_tok_s", ".0f"),
                       ("x s=1", 6, "train_x", ".2f"),
                       ("images/s", 9, lambda r: r.get("images_s", float("nan")), ".3f"),
                       ("x s=1", 6, "sample_x", ".2f")])
    return rows


if __name__ == "__main__":
    main(parse_cli(ShuffleBenchConfig, sys.argv[1:], __doc__))
