"""Inception feature-extraction speed (images/s) on this machine, per input size and batch size.
Prints a table; not a test.

    python bench/eval_speed.py                                   # GPU if present, else CPU
    python bench/eval_speed.py device=cpu threads=2 sizes=[32,256] batch_sizes=[8] images=32
    python bench/eval_speed.py sizes=[256] batch_sizes=[64,256] images=2048   # GPU, FID-50K planning
    python bench/eval_speed.py layouts=[channels_last,contiguous]          # the two memory layouts

Input images are random uint8 at each size; the network resizes them to 299 inside, so the
cost hardly depends on the input size. The last column extrapolates to 50,000 images (one
FID-50K run, without the reference images for precision/recall).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import device_label, print_table  # noqa: E402
from common.config import parse_cli  # noqa: E402
from evaluation.inception import InceptionExtractor  # noqa: E402


@dataclass
class BenchConfig:
    sizes: List[int] = field(default_factory=lambda: [32, 256])  # input image sides (pixels)
    batch_sizes: List[int] = field(default_factory=lambda: [16])  # images per forward pass
    images: int = 64  # images timed per row (after one warm-up batch)
    spatial: bool = True  # also keep the sFID map (what a full scoring run does)
    inception_weights: str = ""  # weights file; empty: $ARGEN_INCEPTION_WEIGHTS, then the cache
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 0  # CPU threads (0: torch default)
    layouts: List[str] = field(default_factory=lambda: ["default"])  # default (what scoring uses:
    #   channels_last on CPU, contiguous on GPU) | channels_last | contiguous, timed side by side


LAYOUTS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


def time_row(extractor: InceptionExtractor, layout: str, size: int, batch: int,
             cfg: BenchConfig) -> dict:
    extractor.net.to(memory_format=LAYOUTS.get(layout, extractor.memory_format))
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
    extractor.forward_batch(data)  # warm-up: allocations, cuDNN autotuning
    n_batches = max(1, cfg.images // batch)
    if extractor.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    extractor.extract((data for _ in range(n_batches)), spatial=cfg.spatial, progress=False)
    seconds = time.perf_counter() - t0  # extract() copies to CPU, so the GPU is done here
    rate = n_batches * batch / seconds
    return {"layout": layout, "size": size, "batch": batch, "images": n_batches * batch,
            "seconds": seconds, "images_per_s": rate, "fid50k_minutes": 50000 / rate / 60}


def main(cfg: BenchConfig) -> list[dict]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    unknown = [x for x in cfg.layouts if x != "default" and x not in LAYOUTS]
    if unknown:
        sys.exit(f"layouts={cfg.layouts}: unknown {unknown}; choose from default, "
                 f"{', '.join(LAYOUTS)}")
    extractor = InceptionExtractor(cfg.inception_weights or None, cfg.device)
    dev = extractor.device
    print(f"# Inception features, fp32 (TF32 off), {dev} ({device_label(dev)}), weights "
          f"{extractor.info.fingerprint[:12]}, sFID map {'on' if cfg.spatial else 'off'}")
    rows = [time_row(extractor, lay, s, b, cfg)
            for s in cfg.sizes for b in cfg.batch_sizes for lay in cfg.layouts]
    print_table(rows, [("layout", 14, "layout", ""), ("size", 5, "size", ""), ("batch", 6, "batch", ""),
                       ("images", 7, "images", ""), ("seconds", 9, "seconds", ".2f"), ("images/s", 10, "images_per_s", ".2f"),
                       ("50k (min)", 10, "fid50k_minutes", ".1f")])
    return rows


if __name__ == "__main__":
    main(parse_cli(BenchConfig, doc=__doc__))
