"""Sampling speed per generation order, and KV-cache decoding vs recomputing the whole sequence
at every step, side by side in one run, on random weights of a registry size. Prints a table
(steps per image, images/s); not a test.

    python bench/sample_speed.py size=AR-B batch_sizes=[1,64] cfg_scale=2.0 grid=16   # GPU
    python bench/sample_speed.py size=debug batch_sizes=[1,16] grid=8                  # CPU
    python bench/sample_speed.py orders=[raster,cell2,cell4,subsample2,whole] batch_sizes=[64]

On a GPU the cached loop runs under torch.cuda.set_sync_debug_mode("error"), so a host
synchronisation inside the decode loop makes this benchmark fail instead of silently
costing time. `compile=true` also times the CUDA-graph decode step.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ar.config import GeneratorSpec, ModelConfig  # noqa: E402
from ar.model import ARModel  # noqa: E402
from ar.orders import OrderConfig  # noqa: E402
from bench.report import device_label, print_table  # noqa: E402
from common.config import parse_cli  # noqa: E402
from common.dist import pick_device  # noqa: E402
from sampling import noise  # noqa: E402
from ar.conditioning import ClassCondition  # noqa: E402
from common import precision  # noqa: E402
from sampling.context import compiled_extend  # noqa: E402
from sampling.generate import generate  # noqa: E402
from sampling.settings import SamplingConfig  # noqa: E402


@dataclass
class BenchConfig:
    size: str = "debug"  # model size from the registry
    orders: List[str] = field(default_factory=lambda: ["raster"])  # raster, cellK, subsampleS, whole
    batch_sizes: List[int] = field(default_factory=lambda: [1, 16])  # images per batch to time
    grid: int = 8  # code grid side (16 = 256 tokens, LlamaGen at 256 px)
    vocab: int = 16384  # codebook size
    classes: int = 1000  # number of classes
    cfg_scale: float = 2.0  # guidance; != 1 doubles the rows
    recompute: bool = True  # also time the no-cache baseline (slow: quadratic in tokens)
    compile: bool = False  # also time the compiled (CUDA graph) extend
    repeats: int = 2  # timed repetitions (after one warm-up)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 where native) | bf16 | fp32
    threads: int = 0  # CPU threads (0: torch default)


@torch.no_grad()
def generate_recompute(model: ARModel, cond, ids, seed, settings) -> torch.Tensor:
    """The slow path: no cache, a full forward pass per step. Elements not yet drawn are 0;
    the block mask keeps them from the rows that predict the current step."""
    from sampling.guidance import scale_at

    order, guided = model.order, settings.cfg_scale != 1.0
    rows = cond.with_null(model.cond.null) if guided else cond
    keys = noise.image_keys(seed, ids)
    elements = torch.arange(order.num_tokens, device=ids.device)
    seq = torch.zeros(len(cond), order.num_tokens, dtype=torch.long, device=ids.device)
    for s in range(order.num_steps):
        lo, hi = order.span(s)
        h = model.hidden(torch.cat([seq, seq]) if guided else seq, rows)[:, lo:hi]
        scale = scale_at(settings, s, order.num_steps) if guided else None
        uniform = noise.uniform_elements(keys, elements[lo:hi], model.head.vocab_size)
        seq[:, lo:hi] = model.head.draw(h, scale, settings, uniform)
    return order.to_grid(seq)


def order_config(name: str) -> dict:
    """"cell2" -> {"name": "cell", "cell": 2}, "subsample2" -> subsample with s = 2, else the
    name: the keys of model.order."""
    for kind in ("cell", "subsample"):
        if name.startswith(kind) and name[len(kind):].isdigit():
            return {"name": kind, kind: int(name[len(kind):])}
    return {"name": name}


def timed(fn, device, repeats: int):
    fn()  # warm-up (and compilation)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats, out


def main(cfg: BenchConfig) -> list[dict]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    bf16 = precision.use_bf16(cfg.precision, device)
    settings = SamplingConfig(cfg_scale=cfg.cfg_scale)
    variants = [("kv-cache", None)] + ([("kv-cache+compile", compiled_extend())] if cfg.compile else [])
    rows = []
    for order in cfg.orders:
        spec = GeneratorSpec(model=ModelConfig(size=cfg.size, order=OrderConfig(**order_config(order))),
                             vocab_size=cfg.vocab, grid_h=cfg.grid, grid_w=cfg.grid,
                             num_classes=cfg.classes)
        torch.manual_seed(0)
        model = ARModel(spec)
        torch.nn.init.normal_(model.head.output.weight, std=0.02)  # non-degenerate logits
        model = model.to(device, torch.bfloat16 if bf16 else torch.float32).eval()
        print(f"# {cfg.size} {model.order}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
              f"params, vocab {cfg.vocab}, cfg {cfg.cfg_scale}, {'bf16' if bf16 else 'fp32'}, "
              f"{device} ({device_label(device)})")
        rows += time_order(model, order, variants, cfg, settings, device)

    def speedup(r):
        return f"{r['speedup_vs_recompute']:.2f}x" if r["speedup_vs_recompute"] else "-"

    print_table(rows, [("order", 11, "order", ""), ("steps", 6, "steps", "d"),
                       ("batch", 5, "batch", ""), ("method", 17, "method", ""),
                       ("s/batch", 9, "sec_per_batch", ".3f"), ("images/s", 10, "images_per_s", ".2f"),
                       ("vs recompute", 12, speedup, ""),
                       ("same tokens", 11, lambda r: str(r["same_tokens_as_kv"]), "")])
    return rows


def time_order(model, order: str, variants, cfg: BenchConfig, settings, device) -> list[dict]:
    rows = []
    for b in cfg.batch_sizes:
        cond = ClassCondition(torch.arange(b, device=device) % cfg.classes)
        ids = torch.arange(b, device=device)
        results = {}
        for name, extend_fn in variants:
            def run(extend_fn=extend_fn):
                return generate(model, cond, ids, 0, settings, extend_fn)
            if device.type == "cuda":
                run()  # warm-up outside the sync check (allocations, autotuning)
                torch.cuda.set_sync_debug_mode("error")
            try:
                results[name] = timed(run, device, cfg.repeats)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        if cfg.recompute:
            results["recompute"] = timed(lambda: generate_recompute(model, cond, ids, 0, settings),
                                         device, 1)
        base = results["kv-cache"]
        for name, (sec, out) in results.items():
            rows.append({"order": order, "steps": model.order.num_steps, "batch": b, "method": name,
                         "sec_per_batch": sec, "images_per_s": b / sec,
                         "speedup_vs_recompute": results["recompute"][0] / sec if "recompute" in results else None,
                         "same_tokens_as_kv": bool(torch.equal(out, base[1]))})
    return rows


if __name__ == "__main__":
    main(parse_cli(BenchConfig, doc=__doc__))
