"""Score an image set against reference statistics: every metric plus its provenance.

    result = score("runs/x/samples/samples.npz", "VIRTUAL_imagenet256_labeled.npz")
    result["metrics"]["fid"], result["warnings"]
    print(summary_line(result))

`result` is what eval_fid.py writes as metrics.json. A metric that cannot be computed (IS
without logits weights, sFID without mu_s/sigma_s, P/R and KID without reference images) is
None with its reason under "unavailable"; a metric is never NaN or inf (a run that would give
one stops with an error naming the metric and the likely cause). Problems that do not stop the
scoring (sample count, size, class balance, lossy files when allowed) are listed under
"warnings", each naming the problem. `kept_result` tells whether a metrics.json already holds
the numbers for the same images, reference, settings and network, so a re-run can keep it.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from common.dist import get_logger
from evaluation.inception import InceptionExtractor
from evaluation.inputs import LOSSY_SUFFIXES, ImageSource, open_images, require_two_images
from evaluation.metrics import (frechet_distance_to_features, gaussian_stats, inception_score,
                                kernel_inception_distance, precision_recall)
from evaluation.reference import Reference, load_reference, reference_pool_features

METRICS = ("fid", "sfid", "is", "pr", "kid")
IS_SPLITS = 10  # ADM: 10 splits of 5,000 for 50k samples
PR_NEIGHBOURS = 3  # k of the k-NN manifold radius (ADM, torch-fidelity)
KID_SUBSETS = 100  # torch-fidelity default


def environment(device: torch.device) -> dict:
    import torch_fidelity

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"torch": torch.__version__, "torch_fidelity": torch_fidelity.__version__,
            "numpy": np.__version__, "python": platform.python_version(),
            "device": f"{device} ({name or platform.machine()})",
            "precision": "float32, TF32 off, no autocast"}


def sample_warnings(source: ImageSource, ref: Reference, num_expected: int, allow_lossy: bool,
                    histogram: list[int] | None) -> list[str]:
    """Everything about the samples that makes the numbers not comparable with a table."""
    warnings = []
    lossy = sum(v for k, v in source.file_formats.items() if k in LOSSY_SUFFIXES)
    if lossy:
        msg = (f"{lossy} of {source.count} images in {source.path} are in a lossy format "
               f"({', '.join(k for k in source.file_formats if k in LOSSY_SUFFIXES)}); JPEG "
               f"artefacts move FID, so save samples as PNG or in an .npz")
        if not allow_lossy:
            raise ValueError(msg + " (or pass allow_lossy=true to score them anyway)")
        warnings.append(msg)
    if num_expected and source.count != num_expected:
        warnings.append(f"{source.count} images, not {num_expected:,}: FID is biased by the "
                        f"sample count, so these numbers are not comparable with ones from "
                        f"{num_expected:,} samples (FID-50K tables need exactly 50,000; set "
                        f"num_expected to the count you mean, or 0 to skip this check)")
    if ref.image_size and tuple(source.image_size) != tuple(ref.image_size):
        warnings.append(f"samples are {source.image_size[1]}x{source.image_size[0]} but the "
                        f"reference images are {ref.image_size[1]}x{ref.image_size[0]}; the "
                        f"resize to 299 inside Inception does not make them comparable")
    if histogram:
        counts = np.asarray(histogram)
        # Balanced labels (N/classes each) and uniform random labels (LlamaGen) are both fine;
        # warn when a class is empty or the spread is beyond what uniform random labels give:
        # Pearson's chi-square more than 5 standard deviations above its mean (classes - 1).
        expected = counts.sum() / len(counts)
        chi2, dof = float(((counts - expected) ** 2).sum() / expected), len(counts) - 1
        if counts.min() == 0 or chi2 > dof + 5 * np.sqrt(2 * dof):
            warnings.append(f"unbalanced class histogram over {len(counts)} classes (min "
                            f"{counts.min()}, max {counts.max()} images per class); published "
                            f"tables use N/classes per class (VAR, MAR) or uniform random labels")
    return warnings


def _histogram(source: ImageSource, ref: Reference) -> list[int] | None:
    if source.labels is None:
        return None
    classes = len(source.class_names or []) or len(ref.meta.get("class_names") or []) \
        or int(source.labels.max()) + 1
    return np.bincount(source.labels, minlength=classes).tolist()


def _fid(name, features, ref_mu, ref_sigma) -> float:
    value = frechet_distance_to_features(features, ref_mu, ref_sigma)
    if not np.isfinite(value):
        raise ValueError(f"{name} came out non-finite ({value}); the features or the reference "
                         f"statistics are broken")
    return value


# what makes each metric NaN or inf, for the message of the last guard in compute_metrics
_NON_FINITE_CAUSE = {
    "fid": "the sample features or the reference's mu/sigma hold NaN/inf",
    "sfid": "the sample features or the reference's mu_s/sigma_s hold NaN/inf",
    "is": "the Inception logits are not finite: the weights' fc layer is damaged; pass other "
          "inception_weights",
    "precision": "the sample features or the reference's arr_0_pool hold NaN/inf; rebuild the "
                 "reference (eval_fid.py mode=ref ... force=true)",
    "kid": "the sample features or the reference's arr_0_pool hold NaN/inf; rebuild the "
           "reference (eval_fid.py mode=ref ... force=true)",
}
_NON_FINITE_CAUSE["recall"] = _NON_FINITE_CAUSE["precision"]
# metric names as people write them ("is unavailable" would read as a verb)
_DISPLAY = {"fid": "FID", "sfid": "sFID", "is": "Inception Score (IS)", "pr": "precision/recall",
            "kid": "KID"}


def require_finite_metrics(metrics: dict) -> None:
    """The last guard: every metric is a finite number or None. A NaN in metrics.json reads
    like a result (and is not valid JSON), so a broken input must stop the run instead."""
    for name, value in metrics.items():
        parts = value.items() if isinstance(value, dict) else [("", value)]
        for part, x in parts:
            if x is not None and not np.isfinite(x):
                label = _DISPLAY.get(name, name) + (f" {part}" if part else "")
                raise ValueError(f"{label} came out non-finite ({x}); likely cause: "
                                 f"{_NON_FINITE_CAUSE[name]}")


def compute_metrics(feats, ref: Reference, ref_pool: np.ndarray | None, wanted, has_logits: bool,
                    seed: int, kid_subset_size: int, device) -> tuple[dict, dict]:
    """(metrics, unavailable reasons) from sample features and the reference; never NaN."""
    metrics, unavailable = {}, {}
    if "fid" in wanted:
        metrics["fid"] = _fid("FID", feats.pool, ref.mu, ref.sigma)
    if "sfid" in wanted:
        if ref.mu_s is None:
            metrics["sfid"], unavailable["sfid"] = None, f"{ref.path} has no mu_s/sigma_s"
        else:
            metrics["sfid"] = _fid("sFID", feats.spatial, ref.mu_s, ref.sigma_s)
    if "is" in wanted:
        if not has_logits:
            metrics["is"] = None
            unavailable["is"] = ("the Inception weights lack the 1008-way logits layer (the "
                                 "fid-helper conversion has none); pass full torch-fidelity or "
                                 "pytorch-fid weights with inception_weights=PATH")
        elif len(feats.logits) < IS_SPLITS:
            metrics["is"], unavailable["is"] = None, f"IS needs at least {IS_SPLITS} images"
        else:
            mean, std = inception_score(feats.logits, IS_SPLITS, shuffle_seed=seed)
            metrics["is"] = {"mean": mean, "std": std}
    if "pr" in wanted or "kid" in wanted:
        reason = None if ref_pool is not None else f"{ref.path} has no arr_0 reference images"
        if "pr" in wanted:
            if reason is None and min(len(ref_pool), len(feats.pool)) > PR_NEIGHBOURS:
                p, r = precision_recall(ref_pool, feats.pool, PR_NEIGHBOURS, device)
                metrics["precision"], metrics["recall"] = p, r
            else:
                metrics["precision"] = metrics["recall"] = None
                unavailable["pr"] = reason or f"needs more than {PR_NEIGHBOURS} images per set"
        if "kid" in wanted:
            size = min(kid_subset_size, len(feats.pool), len(ref_pool) if ref_pool is not None else 0)
            if reason is None and size >= 2:
                mean, std = kernel_inception_distance(feats.pool, ref_pool, KID_SUBSETS, size, seed)
                metrics["kid"] = {"mean": mean, "std": std, "subset_size": size}
            else:
                metrics["kid"], unavailable["kid"] = None, reason or "needs at least 2 images per set"
    require_finite_metrics(metrics)
    return metrics, unavailable


def score_settings(metrics, batch_size: int, seed: int, num_expected: int, kid_subset_size: int,
                   allow_lossy: bool) -> dict:
    """The settings metrics.json records; all but batch_size decide the numbers."""
    return {"metrics": list(metrics), "batch_size": batch_size, "seed": seed,
            "is_splits": IS_SPLITS, "is_shuffled": True, "pr_k": PR_NEIGHBOURS,
            "kid_subsets": KID_SUBSETS, "kid_subset_size": kid_subset_size,
            "num_expected": num_expected, "allow_lossy": allow_lossy}


def score_identity(result: dict) -> dict:
    """What decides a result's numbers: the images (paths, sizes and mtimes via files_stamp),
    the reference's sha256, the network's fingerprint and the settings. batch_size only moves
    float rounding, and the class histogram follows from the images."""
    samples = {k: v for k, v in result["samples"].items() if k not in ("class_histogram", "balanced")}
    settings = {k: v for k, v in result["settings"].items() if k != "batch_size"}
    identity = {"samples": samples, "reference": result["reference"]["sha256"],
                "inception": result["inception"]["fingerprint"], "settings": settings}
    return json.loads(json.dumps(identity))  # tuples -> lists, as a stored file has them


def kept_result(path: str | Path, planned: dict) -> dict | None:
    """The metrics.json at `path` if it was scored from the same inputs as `planned` (a dict
    with the samples, reference, inception and settings entries of a result), else None."""
    try:
        old = json.loads(Path(path).read_text())
        return old if score_identity(old) == score_identity(planned) else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, damaged, older
        return None


def score(images, ref: str | Path | Reference, *, metrics=METRICS, labels=None,
          extractor: InceptionExtractor | None = None, weights: str | None = None,
          device: str = "auto", batch_size: int = 64, num_workers: int = 2, seed: int = 2020,
          num_expected: int = 50000, allow_lossy: bool = False, kid_subset_size: int = 1000,
          progress: bool = True) -> dict:
    """Score `images` (ADM .npz, image folder, uint8 NHWC array or an opened ImageSource)
    against the reference (.npz path or a loaded Reference).

    Pass an `extractor` to reuse a loaded network across calls (e.g. rFID during training).
    """
    t0 = time.time()
    log = get_logger("eval")
    unknown = sorted(set(metrics) - set(METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(METRICS)}")
    ref_data = ref if isinstance(ref, Reference) else load_reference(ref)
    source = open_images(images, labels=labels, num_workers=num_workers)
    require_two_images(source)
    histogram = _histogram(source, ref_data)
    warnings = sample_warnings(source, ref_data, num_expected, allow_lossy, histogram)
    extractor = extractor or InceptionExtractor(weights, device)
    if extractor.device.type == "cpu" and len(source) > 5000:  # ~0.15 s per image on 2 cores
        log.warning(f"scoring {len(source)} images on the CPU takes hours; use a GPU machine")
    feats = extractor.extract(source.batches(batch_size), total=len(source),
                              spatial="sfid" in metrics and ref_data.mu_s is not None,
                              desc="sample features", progress=progress)
    if not np.isfinite(feats.pool).all():
        raise ValueError(f"{source.path or 'images'}: Inception features are not finite; the "
                         f"weights file {extractor.info.path} is probably damaged")
    ref_pool = None
    if ref_data.images is not None and ({"pr", "kid"} & set(metrics)):
        ref_pool = reference_pool_features(ref_data, extractor, batch_size, progress)
    values, unavailable = compute_metrics(feats, ref_data, ref_pool, set(metrics),
                                          extractor.info.has_logits, seed, kid_subset_size,
                                          extractor.device)
    for name, why in unavailable.items():
        warnings.append(f"{_DISPLAY.get(name, name)} not computed: {why}")
    for w in warnings:
        log.warning(f"warning: {w}")
    return {"metrics": values, "unavailable": unavailable,
            "samples": {**source.describe(), "class_histogram": histogram,
                        "balanced": (max(histogram) - min(histogram) <= 1) if histogram else None},
            "reference": ref_data.describe(),
            "inception": vars(extractor.info),
            "settings": score_settings(metrics, batch_size, seed, num_expected, kid_subset_size,
                                       allow_lossy),
            "environment": environment(extractor.device),
            "warnings": warnings, "wall_time_s": round(time.time() - t0, 2)}


def fid_between(images, reference_images, *, extractor: InceptionExtractor | None = None,
                weights: str | None = None, device: str = "auto", batch_size: int = 64,
                progress: bool = False) -> float:
    """FID of one image set against another with no reference file, e.g. rFID: tokenizer
    reconstructions vs the held-out originals they came from. Either argument is anything
    `open_images` takes (uint8 NHWC array or tensor, .npz, folder); same features and formula
    as `score`. The statistics side is `reference_images`."""
    extractor = extractor or InceptionExtractor(weights, device)
    a, b = (extractor.extract(open_images(x, num_workers=0).batches(batch_size), spatial=False,
                              desc=desc, progress=progress).pool
            for x, desc in ((images, "features"), (reference_images, "reference features")))
    return _fid("FID", a, *gaussian_stats(b))


def summary_line(result: dict) -> str:
    """'FID 12.34 | sFID 5.67 | IS n/a | P 0.812 R 0.534 | KID 0.00123 | 500 images, 2 warnings'."""
    m = result["metrics"]

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    parts = []
    if "fid" in m:
        parts.append(f"FID {fmt(m['fid'], '.4f')}")
    if "sfid" in m:
        parts.append(f"sFID {fmt(m['sfid'], '.4f')}")
    if "is" in m:
        parts.append(f"IS {fmt(m['is'] and m['is']['mean'], '.3f')}")
    if "precision" in m:
        parts.append(f"P {fmt(m['precision'], '.4f')} R {fmt(m['recall'], '.4f')}")
    if "kid" in m:
        parts.append(f"KID {fmt(m['kid'] and m['kid']['mean'], '.5f')}")
    n, w = result["samples"]["count"], len(result["warnings"])
    return " | ".join(parts + [f"{n} images vs {Path(result['reference']['path']).name}, "
                               f"{w} warning{'s' * (w != 1)}"])
