"""Training speed: samples/s, tokens/s and peak memory of generator training steps (forward,
backward, AdamW), on random codes and weights of a registry size. Prints a table; not a test.

    python bench/train_speed.py size=AR-B micro_batches=[32,64] grid=16          # GPU, bf16
    python bench/train_speed.py size=debug micro_batches=[8,32] grid=8           # CPU
    python bench/train_speed.py size=AR-B compile=true                           # + torch.compile
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ar.config import GeneratorSpec, ModelConfig  # noqa: E402
from ar.model import ARModel  # noqa: E402
from ar.optim import make_adamw  # noqa: E402
from bench.report import device_label, print_table  # noqa: E402
from common import precision  # noqa: E402
from common.config import parse_cli  # noqa: E402
from common.dist import pick_device  # noqa: E402


@dataclass
class BenchConfig:
    size: str = "debug"  # model size from the registry
    micro_batches: List[int] = field(default_factory=lambda: [8, 32])  # images per step to time
    grid: int = 8  # code grid side (16 = 256 tokens)
    vocab: int = 16384  # codebook size
    classes: int = 1000  # number of classes
    steps: int = 5  # timed steps (after 2 warm-up steps)
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 autocast on GPUs and on CPUs with native bf16) | bf16 | fp32
    threads: int = 0  # CPU threads (0: torch default)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (process peak)


def main(cfg: BenchConfig) -> list[dict]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    spec = GeneratorSpec(model=ModelConfig(size=cfg.size), vocab_size=cfg.vocab, grid_h=cfg.grid,
                         grid_w=cfg.grid, num_classes=cfg.classes)
    torch.manual_seed(0)
    model = ARModel(spec).to(device).train()
    opt = make_adamw(model, 1e-4, (0.9, 0.95), 0.05, device)
    forward = torch.compile(model) if cfg.compile else model
    bf16 = precision.use_bf16(cfg.precision, device)
    n_params = sum(p.numel() for p in model.parameters())
    n_tok = spec.grid_h * spec.grid_w
    print(f"# {cfg.size}: {n_params / 1e6:.1f}M params, {n_tok} tokens/image, "
          f"{'bf16 autocast' if bf16 else 'fp32'}, compile={cfg.compile}, {device}"
          f" ({device_label(device)})")
    rows = []
    for b in cfg.micro_batches:
        codes = torch.randint(0, cfg.vocab, (b, cfg.grid, cfg.grid), device=device)
        labels = torch.randint(0, cfg.classes + 1, (b,), device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def step():
            with precision.autocast(cfg.precision, device):  # exactly what train_gen.py does
                loss = forward(codes, labels)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(2):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(cfg.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        sec = (time.perf_counter() - t0) / cfg.steps
        # 6 N T: forward + backward matmul FLOPs per token, the usual MFU estimate
        tflops = 6 * n_params * b * n_tok / sec / 1e12
        rows.append({"micro_batch": b, "sec_per_step": sec, "samples_per_s": b / sec,
                     "tokens_per_s": b * n_tok / sec, "model_tflops": tflops,
                     "peak_mem_gb": peak_memory_gb(device)})
    print_table(rows, [("batch", 6, "micro_batch", ""), ("s/step", 8, "sec_per_step", ".3f"),
                       ("samples/s", 10, "samples_per_s", ".1f"), ("tokens/s", 11, "tokens_per_s", ".0f"),
                       ("TFLOP/s(6NT)", 13, "model_tflops", ".3f"), ("peak GiB", 9, "peak_mem_gb", ".2f")])
    return rows


if __name__ == "__main__":
    main(parse_cli(BenchConfig, doc=__doc__))
