"""Speculative decoding against plain sampling, side by side, on models trained with argen:
forward passes per image, mean accepted length, wall-clock at batch 1 and batch 16, FID and
the class check on 500 samples. Prints a table per model (docs/speculative.md's); not a test.

    make quickstart                          # the quickstart model (64 tokens of 32 px shapes)
    python scripts/quickstart.py jitter64    # the harder model (256 tokens of jittered 64 px shapes)
    python bench/speculative.py models=[quickstart,jitter64]

Every row samples the same 500 images (balanced labels, seed 0) with the model's sampling
settings (configs/sample/<model>.yaml) and is scored like the quickstart (FID against the 500
held-out images; the class check: how often a sample's nearest training image has its class).
Quality results are kept in OUT/<model>/<row>.json: `stage=quality` samples and scores
without timing, `stage=timing` re-times reusing them. The timings run last, one row after the
other in this process (run nothing else meanwhile: the ratios to plain sampling are what to
read).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ar.conditioning import ClassCondition  # noqa: E402
from bench.report import print_table, seconds_per_call  # noqa: E402
from common.config import check_fields, load_config, parse_cli  # noqa: E402
from common.dist import get_logger  # noqa: E402
from common.io import atomic_write_text  # noqa: E402
from sampling.outputs import decode_codes  # noqa: E402
from sampling.guidance import step_scales  # noqa: E402
from sampling.run import SampleRunConfig, load_models  # noqa: E402
from sampling.generate import plain_passes, sample_codes  # noqa: E402
from sampling.speculative import SpeculativeConfig, SpeculativeStats  # noqa: E402
from scripts.quickstart import PIPELINES, dataset_of, stage_arg  # noqa: E402


@dataclass
class SpeculativeBenchConfig:
    models: List[str] = field(default_factory=lambda: ["quickstart", "jitter64"])  # quickstart (make quickstart) | jitter64 (scripts/quickstart.py jitter64)
    rows: List[str] = field(default_factory=lambda: [
        "plain", "plain:seed=1", "sjd:16", "coupled:16", "coupled:16:init=above", "coupled:32", "gsd:16",
        "gsd:32", "gsd:32:gsd_p_threshold=1:gsd_d_threshold=1e9"])  # sampler[:window][:speculative option=value]...; seed=N: other noise
    num_images: int = 500  # samples per row for FID and the class check
    batch_size: int = 100  # images per batch for those samples
    latency_images: int = 8  # images timed one at a time (batch 1)
    batch: int = 16  # the second timing's batch
    batch_repeats: int = 2  # timed batches (after one warm-up)
    stage: str = "all"  # all | quality (sample and score the rows, keep the results) | timing (time, reusing kept results)
    out: str = "runs/speculative"
    threads: int = 0  # CPU threads (0: torch's default)

    def validate(self) -> None:
        check_fields(self, "", {"stage": ("all", "quality", "timing"), "num_images": ">= 2",
                                "batch_size": ">= 1", "latency_images": ">= 1", "batch": ">= 1",
                                "batch_repeats": ">= 1", "threads": ">= 0"})
        for row in self.rows:
            parse_row(row)


def parse_row(row: str) -> tuple[str, SpeculativeConfig, int]:
    """'gsd:32:gsd_p_threshold=1' -> ("gsd", SpeculativeConfig(window=32, gsd_p_threshold=1.0),
    seed 0); 'plain:seed=1': plain sampling with other noise (FID's sampling noise)."""
    sampler, *rest = row.split(":")
    spec, seed = SpeculativeConfig(), 0
    for option in rest:
        if "=" not in option:
            spec.window = int(option)
            continue
        key, value = option.split("=")
        if key == "seed":
            seed = int(value)
        else:
            setattr(spec, key, type(getattr(spec, key))(value))
    spec.validate()
    return sampler, spec, seed


def model_files(name: str) -> tuple[str, str, int, str]:
    """(run folder, data folder, resolution, sampling config) of a scripts/quickstart.py pipeline."""
    if name not in ("quickstart", *PIPELINES):
        raise SystemExit(f"models: unknown {name!r}; choose from {['quickstart', *PIPELINES]}")
    run, stages = PIPELINES["token" if name == "quickstart" else name]
    return (run, *dataset_of(stages), stage_arg(stages, "grid", "--config"))


def draw(model, settings, sampler, spec, ids, classes, batch, seed=0):
    """Codes for the images `ids` (balanced labels) in batches, and their summed cost."""
    codes, cost = [], SpeculativeStats()
    for i in ids.split(batch):
        c, stats = sample_codes(model, ClassCondition(i % classes), i, seed, settings, sampler, spec)
        codes.append(c)
        cost.add(stats)
    return torch.cat(codes), cost


@torch.no_grad()
def mean_entropy(model, codes: torch.Tensor, labels: torch.Tensor, settings) -> float:
    """Mean entropy (nats) of the distribution each token is drawn from (CFG and filters as
    sampled), teacher-forced on the samples `codes`."""
    seq = model.order.to_sequence(codes)
    cond = ClassCondition(labels)
    h = model.hidden(seq, cond)
    scale = None
    if settings.cfg_scale != 1.0:
        h = torch.cat([h, model.hidden(seq, ClassCondition(torch.full_like(labels, model.cond.null)))])
        scale = step_scales(settings, model.order.num_steps)[model.order.step_of][:, None]  # (N, 1)
    p = model.head.probs(h, scale, settings)
    return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean())


def quality(cfg, name, model, tokenizer, settings, row, score_fn) -> dict:
    path = Path(cfg.out) / name / f"{row.replace(':', '_')}.json"
    if path.is_file():
        return json.loads(path.read_text())
    if cfg.stage == "timing":
        raise SystemExit(f"stage=timing, but {path} is missing: run stage=quality (or all) first")
    sampler, spec, seed = parse_row(row)
    classes = model.spec.num_classes
    ids = torch.arange(cfg.num_images)
    t0 = time.time()
    codes, cost = draw(model, settings, sampler, spec, ids, classes, cfg.batch_size, seed)
    seconds = time.time() - t0
    images = decode_codes(tokenizer, codes)
    result = {"row": row, "sampler": sampler, "speculative": asdict(spec), **cost.summary(),
              "plain_passes": plain_passes(model), "sample_seconds_batch": round(seconds, 1),
              **score_fn(images, (ids % classes).numpy())}
    if row == "plain":
        result["entropy_nats"] = mean_entropy(model, codes, ids % classes, settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result


def timing(cfg, model, settings, row) -> dict:
    """Seconds per image at batch 1 and at `cfg.batch`, each call on images not drawn before."""
    sampler, spec, _ = parse_row(row)
    cpu = torch.device("cpu")

    def batches(size: int):
        first = iter(range(0, 1 << 30, size))
        return lambda: draw(model, settings, sampler, spec, torch.arange(size) + next(first),
                            model.spec.num_classes, size)

    return {"latency_s": seconds_per_call(batches(1), cpu, cfg.latency_images),
            "batch_s_per_image": seconds_per_call(batches(cfg.batch), cpu, cfg.batch_repeats) / cfg.batch}


def bench_model(cfg: SpeculativeBenchConfig, name: str) -> list[dict]:
    from evaluation.class_check import class_agreement
    from evaluation.inception import InceptionExtractor
    from evaluation.score import score

    run, data, resolution, sample_config = model_files(name)
    sample = load_config(SampleRunConfig, [sample_config],
                         [f"weights={run}/gen/weights/ema.safetensors", "out=unused", "device=cpu"])
    model, tokenizer = load_models(sample, torch.device("cpu"), get_logger("bench"))
    if sample.precision != "fp32":
        raise SystemExit(f"{sample_config}: the bench compares fp32 sampling (precision: fp32)")
    settings = sample.sampling
    extractor = None

    def score_fn(images: np.ndarray, labels: np.ndarray) -> dict:
        nonlocal extractor
        extractor = extractor or InceptionExtractor(None, "cpu")
        fid = score(images, f"{run}/heldout_ref.npz", metrics=["fid"], labels=labels,
                    extractor=extractor, num_expected=len(images), num_workers=0,
                    progress=False)["metrics"]["fid"]
        check = class_agreement(images, labels, f"{data}/train", resolution)["agreement"]
        return {"fid": fid, "class_check": check}

    rows = [quality(cfg, name, model, tokenizer, settings, row, score_fn) for row in cfg.rows]
    if cfg.stage == "quality":
        return rows
    for row in rows:  # one after the other, nothing else in between
        row.update(timing(cfg, model, settings, row["row"]))
    base = next((r for r in rows if r["row"] == "plain"), rows[0])
    for row in rows:
        row["latency_speedup"] = base["latency_s"] / row["latency_s"]
        row["batch_speedup"] = base["batch_s_per_image"] / row["batch_s_per_image"]
        row["pass_reduction"] = base["forward_passes_per_image"] / row["forward_passes_per_image"]
        row["fid_change"] = row["fid"] / base["fid"] - 1
    print(f"\n# {name}: {model.order.num_tokens} tokens per image ({model.spec.grid_h}x"
          f"{model.spec.grid_w}, {model.spec.vocab_size} codes), mean per-token entropy "
          f"{base.get('entropy_nats', float('nan')):.2f} nats; sampling {sample_config} "
          f"(cfg {settings.cfg_scale}, top-p {settings.top_p}); CPU, {torch.get_num_threads()} threads")
    print_table(rows, [("sampler", 22, lambda r: r["row"].replace("gsd_p_threshold", "p").replace(
                           "gsd_d_threshold", "d").replace("init=", ""), ""), ("passes/img", 10, "forward_passes_per_image", ".1f"),
                       ("x fewer", 7, "pass_reduction", ".2f"), ("accepted", 8, "mean_accepted_length", ".2f"),
                       ("b1 ms/img", 9, lambda r: 1000 * r["latency_s"], ".1f"),
                       ("b1 x", 5, "latency_speedup", ".2f"),
                       ("b16 ms/img", 10, lambda r: 1000 * r["batch_s_per_image"], ".1f"),
                       ("b16 x", 5, "batch_speedup", ".2f"), ("FID", 7, "fid", ".2f"),
                       ("FID chg", 7, lambda r: f"{100 * r['fid_change']:+.1f}%", ""),
                       ("class", 5, "class_check", ".0%")])
    return rows


def main(cfg: SpeculativeBenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    results = {name: bench_model(cfg, name) for name in cfg.models}
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(cfg.out) / "speculative.json", json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main(parse_cli(SpeculativeBenchConfig, doc=__doc__))
