"""Generation orders compared on the quickstart's `shapes` codes at one training budget: final
loss, FID (500 samples vs the 500 held-out images), the class check, forward passes per image
and sampling images/s at batch 64, side by side. Prints a table (docs/benchmarks.md's); not a test.

    make quickstart                                   # once: data, tokenizer, codes, reference
    python bench/compare_orders.py orders=[raster,cell2,cell4,subsample2,whole]

Each order trains with configs/quickstart.yaml plus `model.order.name=...` (the same steps, batch
and model size), samples with configs/sample/quickstart.yaml, and is scored like the
quickstart. Every stage is the command a user runs and resumes or skips finished work, so
re-running continues; the sampling speeds are measured last, one order after the other in
this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ar.checkpoint import load_generator  # noqa: E402
from ar.conditioning import ClassCondition  # noqa: E402
from bench.report import print_table  # noqa: E402
from bench.sample_speed import order_config  # noqa: E402
from common.config import parse_cli  # noqa: E402
from sampling.generate import generate  # noqa: E402
from sampling.settings import SamplingConfig  # noqa: E402


@dataclass
class CompareConfig:
    orders: List[str] = field(default_factory=lambda: ["raster", "cell2", "cell4", "subsample2", "whole"])
    out: str = "runs/orders"  # one folder per order
    quickstart: str = "runs/quickstart"  # where `make quickstart` left the codes and the reference
    data: str = "data/shapes32"  # the quickstart's dataset (training images for the class check)
    speed_batch: int = 64  # images per batch when timing sampling
    speed_repeats: int = 2  # timed batches per order (after one warm-up)
    threads: int = 0  # CPU threads for the timing (0: torch's default)


def stage(cmd: list[str]) -> None:
    print("\n=== " + " ".join(cmd), flush=True)
    if subprocess.run([sys.executable] + cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"compare_orders: {' '.join(cmd)} failed; fix it and run again (finished work is kept)")


def run_order(cfg: CompareConfig, name: str) -> dict:
    run, qs = Path(cfg.out) / name, cfg.quickstart
    overrides = [f"model.order.{k}={v}" for k, v in order_config(name).items()]
    stage(["train_gen.py", "--config", "configs/quickstart.yaml", f"out_dir={run}/gen",
           f"data.codes={qs}/codes", *overrides])
    weights = f"{run}/gen/weights/ema.safetensors"
    stage(["sample.py", "--config", "configs/sample/quickstart.yaml", f"weights={weights}",
           f"out={run}/samples", "mode=images", "num_images=500"])
    stage(["eval_fid.py", f"images={run}/samples/samples.npz", f"ref={qs}/heldout_ref.npz",
           f"out={run}/metrics.json", "num_expected=500", "metrics=[fid]"])
    summary = json.loads((run / "gen" / "summary.json").read_text())
    fid = json.loads((run / "metrics.json").read_text())["metrics"]["fid"]
    return {"order": name, "loss": summary["final"]["loss"], "fid": fid,
            "class_check": class_check(cfg, run / "samples" / "samples.npz"), "weights": weights}


def class_check(cfg: CompareConfig, samples: Path) -> float:
    """How often a sample's nearest training image (pixels) has the sample's class."""
    from evaluation.class_check import class_agreement

    with np.load(samples) as z:
        return class_agreement(z["arr_0"], z["arr_1"], f"{cfg.data}/train", 32)["agreement"]


def sampling_speed(weights: str, batch: int, repeats: int) -> tuple[int, float]:
    """(forward passes per image, images/s) of the quickstart's sampling at `batch` on the CPU."""
    model = load_generator(weights, "cpu")
    settings = SamplingConfig(cfg_scale=1.5, top_p=0.9)  # configs/sample/quickstart.yaml
    cond = ClassCondition(torch.arange(batch) % model.spec.num_classes)
    ids = torch.arange(batch)
    generate(model, cond, ids, 0, settings)  # warm-up
    t0 = time.perf_counter()
    for r in range(repeats):
        generate(model, cond, ids + (r + 1) * batch, 0, settings)
    seconds = (time.perf_counter() - t0) / repeats
    return model.order.num_steps + 1, batch / seconds  # the prefill is a forward pass too


def main(cfg: CompareConfig) -> list[dict]:
    rows = [run_order(cfg, name) for name in cfg.orders]
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for row in rows:
        row["passes"], row["images_per_s"] = sampling_speed(row["weights"], cfg.speed_batch,
                                                            cfg.speed_repeats)
    print(f"\n# {len(rows)} orders on the quickstart codes, configs/quickstart.yaml budget; "
          f"sampling at batch {cfg.speed_batch} on the CPU ({torch.get_num_threads()} threads)")
    print_table(rows, [("order", 11, "order", ""), ("final loss", 10, "loss", ".3f"),
                       ("FID", 8, "fid", ".2f"), ("class check", 11, "class_check", ".0%"),
                       ("passes/image", 12, "passes", "d"), ("images/s", 9, "images_per_s", ".1f")])
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out) / "compare.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main(parse_cli(CompareConfig, doc=__doc__))
