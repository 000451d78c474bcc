"""Sampling speed: KV-cache decoding vs recomputing the whole sequence at every step, side by
side in one run, on random weights of a registry size. Prints a table; not a test.

    python bench/sample_speed.py size=AR-B batch_sizes=[1,64] cfg_scale=2.0 grid=16   # GPU
    python bench/sample_speed.py size=debug batch_sizes=[1,16] grid=8                  # CPU

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

from ar.model import ARModel, GeneratorSpec, ModelConfig  # noqa: E402
from bench.report import device_label, print_table  # noqa: E402
from common.config import parse_cli  # noqa: E402
from common.dist import pick_device  # noqa: E402
from sampling import noise  # noqa: E402
from sampling.generate import SamplingConfig, compiled_decode_step, generate  # noqa: E402


@dataclass
class BenchConfig:
    size: str = "debug"  # model size from the registry
    batch_sizes: List[int] = field(default_factory=lambda: [1, 16])  # images per batch to time
    grid: int = 8  # code grid side (16 = 256 tokens, LlamaGen at 256 px)
    vocab: int = 16384  # codebook size
    classes: int = 1000  # number of classes
    cfg_scale: float = 2.0  # guidance; != 1 doubles the rows
    recompute: bool = True  # also time the no-cache baseline (slow: quadratic in tokens)
    compile: bool = False  # also time the compiled (CUDA graph) decode step
    repeats: int = 2  # timed repetitions (after one warm-up)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on GPU) | bf16 | fp32
    threads: int = 0  # CPU threads (0: torch default)


@torch.no_grad()
def generate_recompute(model: ARModel, labels, ids, seed, settings) -> torch.Tensor:
    """The slow path: no cache, a full forward over everything generated so far per token."""
    guided = settings.cfg_scale != 1.0
    rows = torch.cat([labels, torch.full_like(labels, model.cond.null_id)]) if guided else labels
    keys = noise.image_keys(seed, ids)
    seq = torch.empty(labels.shape[0], 0, dtype=torch.long, device=labels.device)
    for t in range(model.num_tokens):
        inputs = torch.cat([seq, seq]) if guided else seq
        h = model.hidden(inputs, rows)[:, -1]
        tok = model.head.sample(h, settings.cfg_scale if guided else None, settings,
                                lambda size: noise.uniform(keys, t, size))
        seq = torch.cat([seq, tok[:, None]], dim=1)
    return model.order.to_grid(seq)


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
    spec = GeneratorSpec(model=ModelConfig(size=cfg.size), vocab_size=cfg.vocab, grid_h=cfg.grid,
                         grid_w=cfg.grid, num_classes=cfg.classes)
    torch.manual_seed(0)
    model = ARModel(spec)
    torch.nn.init.normal_(model.head.output.weight, std=0.02)  # non-degenerate logits
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    model = model.to(device, torch.bfloat16 if bf16 else torch.float32).eval()
    settings = SamplingConfig(cfg_scale=cfg.cfg_scale)
    n_tok = model.num_tokens
    print(f"# {cfg.size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
          f"{n_tok} tokens/image, vocab {cfg.vocab}, cfg {cfg.cfg_scale}, "
          f"{'bf16' if bf16 else 'fp32'}, {device} ({device_label(device)})")
    variants = [("kv-cache", None)]
    if cfg.compile:
        variants.append(("kv-cache+compile", compiled_decode_step()))
    rows = []
    for b in cfg.batch_sizes:
        labels = torch.arange(b, device=device) % cfg.classes
        ids = torch.arange(b, device=device)
        results = {}
        for name, step_fn in variants:
            def run(step_fn=step_fn):
                return generate(model, labels, ids, 0, settings, step_fn)
            if device.type == "cuda":
                run()  # warm-up outside the sync check (allocations, autotuning)
                torch.cuda.set_sync_debug_mode("error")
            try:
                results[name] = timed(run, device, cfg.repeats)
            finally:
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
        if cfg.recompute:
            results["recompute"] = timed(lambda: generate_recompute(model, labels, ids, 0, settings),
                                         device, 1)
        base = results["kv-cache"]
        for name, (sec, out) in results.items():
            rows.append({"batch": b, "method": name, "sec_per_batch": sec,
                         "images_per_s": b / sec, "tokens_per_s": b * n_tok / sec,
                         "speedup_vs_recompute": results["recompute"][0] / sec if "recompute" in results else None,
                         "same_tokens_as_kv": bool(torch.equal(out, base[1]))})
    def speedup(r):
        return f"{r['speedup_vs_recompute']:.2f}x" if r["speedup_vs_recompute"] else "-"

    print_table(rows, [("batch", 5, "batch", ""), ("method", 18, "method", ""),
                       ("s/batch", 9, "sec_per_batch", ".3f"), ("images/s", 10, "images_per_s", ".2f"),
                       ("tokens/s", 11, "tokens_per_s", ".1f"), ("vs recompute", 12, speedup, ""),
                       ("same tokens", 11, lambda r: str(r["same_tokens_as_kv"]), "")])
    return rows


if __name__ == "__main__":
    main(parse_cli(BenchConfig, doc=__doc__))
