"""Token-Shuffle at s = 1, 2, 4 on the same captioned data at 128 px, the same training steps:
training tokens/s, sampling images/s, FID (500 samples for the 500 held-out captions vs the
500 held-out images) and prompt following. Prints a table (docs/text-and-token-shuffle.md's); not a test.

    python bench/shuffle_compare.py                  # about 2 hours on a CPU (the VQ: 34 min, s = 1: 50)

The data are `shapes` at 128 px with captions (data/shapes128), tokenized by a 512-code VQ to
16 x 16 codes (configs/tokenizer/vq_shapes128.yaml) and their captions by a BPE. Each s trains
configs/shuffle128.yaml (s = 1: the next-token model; s > 1: model.order.name=cell
model.order.cell=s model.inputs.name=shuffle) and samples with configs/sample/shuffle128.yaml. Every stage is the
command a user runs and resumes or skips finished work, so re-running continues; the speeds are
measured last, in this process, one s after the other on random codes of the same shapes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ar.checkpoint import load_generator  # noqa: E402
from bench.report import print_table  # noqa: E402
from bench.shuffle_speed import ShuffleBenchConfig, images_per_s, train_tokens_per_s  # noqa: E402
from common.config import parse_cli  # noqa: E402

DATA, RESOLUTION = "data/shapes128", 128


@dataclass
class ShuffleCompareConfig:
    shuffles: List[int] = field(default_factory=lambda: [1, 2, 4])  # window sides s
    out: str = "runs/shuffle128"  # the shared VQ, codes and reference; one folder per s
    steps: int = 1200  # training steps of every s (batch 32); s = 1 takes ~1.2 s a step on 2 CPU cores
    speed_batch: int = 32  # images per timed training step and sampling batch
    threads: int = 0  # CPU threads for the timing (0: torch's default)


def stage(cmd: list[str]) -> None:
    print("\n=== " + " ".join(cmd), flush=True)
    if subprocess.run([sys.executable] + cmd, cwd=ROOT).returncode != 0:
        sys.exit(f"shuffle_compare: {' '.join(cmd)} failed; fix it and run again (finished work is kept)")


def shared_stages(out: str) -> None:
    """Data, reference statistics, the VQ and the captioned code cache, shared by every s."""
    stage(["-m", "dataset.shapes", f"out={DATA}", f"resolution={RESOLUTION}", "num_train=8000",
           "num_heldout=500", "seed=0"])
    stage(["eval_fid.py", "mode=ref", f"images={DATA}/heldout", f"resolution={RESOLUTION}",
           f"out={out}/heldout_ref.npz"])
    stage(["-m", "tokenizer.train", "--config", "configs/tokenizer/vq_shapes128.yaml",
           f"out_dir={out}/vq"])
    stage(["-m", "tokenizer.encode", f"data.root={DATA}/train", f"data.resolution={RESOLUTION}",
           f"tokenizer={out}/vq/vq.safetensors", f"out={out}/codes", "num_workers=0", "text.kind=bpe"])


def shuffle_overrides(s: int) -> list[str]:
    return [] if s == 1 else ["model.order.name=cell", f"model.order.cell={s}", "model.inputs.name=shuffle"]


def run_s(out: str, s: int, steps: int) -> dict:
    run = Path(out) / f"s{s}"
    stage(["train_gen.py", "--config", "configs/shuffle128.yaml", f"out_dir={run}/gen",
           f"data.codes={out}/codes", f"train.max_steps={steps}", *shuffle_overrides(s)])
    sample = ["sample.py", "--config", "configs/sample/shuffle128.yaml",
              f"weights={run}/gen/weights/ema.safetensors"]
    stage(sample + [f"out={run}/grid.png", "mode=grid"])
    stage(sample + [f"out={run}/samples", "mode=images", "num_images=500",
                    f"prompts={DATA}/heldout/captions.jsonl"])
    stage(["eval_fid.py", f"images={run}/samples/samples.npz", f"ref={out}/heldout_ref.npz",
           f"out={run}/metrics.json", "num_expected=500", "metrics=[fid]"])
    stage(["-m", "evaluation.prompt_follow", f"npz={run}/samples/samples.npz",
           f"out={run}/prompt_following.json"])
    summary = json.loads((run / "gen" / "summary.json").read_text())
    follow = json.loads((run / "prompt_following.json").read_text())["prompt_following"]
    fid = json.loads((run / "metrics.json").read_text())["metrics"]["fid"]
    return {"s": s, "loss": summary["final"]["loss"], "fid": fid, **{f"pf_{k}": follow[k] for k in
            ("shape", "color", "size", "position", "background", "all_correct")},
            "weights": str(run / "gen" / "weights" / "ema.safetensors")}


def speeds(row: dict, cfg: ShuffleCompareConfig) -> None:
    """Training tokens/s and sampling images/s of the trained model's shape, timed here."""
    model = load_generator(row["weights"]).requires_grad_(True)  # loaded frozen, for inference
    spec = model.spec
    bench = ShuffleBenchConfig(train_batch=cfg.speed_batch, sample_batch=cfg.speed_batch,
                               vocab=spec.vocab_size, cfg_scale=1.5, train_steps=3)
    device = torch.device("cpu")
    row["positions"] = model.length
    row["train_tok_s"] = train_tokens_per_s(model, bench, device, bf16=False)
    row["images_s"] = images_per_s(model.eval(), bench, device, None)


def main(cfg: ShuffleCompareConfig) -> list[dict]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    shared_stages(cfg.out)
    rows = [run_s(cfg.out, s, cfg.steps) for s in cfg.shuffles]
    for row in rows:
        speeds(row, cfg)
    print_table(rows, [("s", 2, "s", "d"), ("positions", 9, "positions", "d"), ("loss", 6, "loss", ".3f"),
                       ("train tok/s", 11, "train_tok_s", ".0f"), ("images/s", 8, "images_s", ".2f"),
                       ("FID", 7, "fid", ".2f"), ("shape", 6, "pf_shape", ".2f"),
                       ("color", 6, "pf_color", ".2f"), ("size", 6, "pf_size", ".2f"),
                       ("pos.", 6, "pf_position", ".2f"), ("bg", 6, "pf_background", ".2f"),
                       ("all", 6, "pf_all_correct", ".2f")])
    Path(cfg.out, "table.json").write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main(parse_cli(ShuffleCompareConfig, sys.argv[1:], __doc__))
