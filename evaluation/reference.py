"""Reference statistics files (.npz): load and validate ADM / MAR files, or build one.

    ref = load_reference("VIRTUAL_imagenet256_labeled.npz")
    meta = build_reference(open_images("data/shapes32/heldout", resolution=32), "ref.npz", extractor)

Keys, in the ADM evaluator's layout (reference/evaluation.md 1 and 6.2):
    mu (2048,), sigma (2048, 2048)      pool_3 statistics                   required
    mu_s (2023,), sigma_s (2023, 2023)  sFID statistics (mixed_6/conv)      optional: sFID
    arr_0 uint8 (N, H, W, 3)            reference images                    optional: P/R, KID
ADM's `VIRTUAL_imagenet256_labeled.npz` has all of them (10k images in arr_0, statistics of the
whole training set); MAR's `adm_in256_stats.npz` has mu/sigma only. Files built here also hold
`arr_1` (labels of arr_0), `arr_0_pool` (arr_0's pool features, reused when the Inception
fingerprint matches, so P/R does not re-run the network) and `argen_meta` (a JSON string).
Everything is read with `allow_pickle=False`.
"""

from __future__ import annotations

import json
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.io import atomic_path, sha256_file
from evaluation.inception import SPATIAL_DIM, InceptionExtractor
from evaluation.inputs import (ImageSource, NpzImages, open_images, require_npz,
                               require_two_images)
from evaluation.metrics import RunningGaussian

POOL_DIM = 2048
FORMAT, VERSION = "argen-fid-reference", 1
SELF_COMPUTED_NOTE = ("self-computed statistics: compare only with numbers scored against this "
                      "same file, not with tables scored against the published ADM reference")
HOW_TO_GET_REF = ("build one with `python eval_fid.py mode=ref images=DIR_OR_NPZ out=REF.npz` "
                  "or use ADM's VIRTUAL_imagenet256_labeled.npz / MAR's adm_in256_stats.npz")
REBUILD = "rebuild the reference (eval_fid.py mode=ref ... force=true) or fetch it again"


@dataclass
class Reference:
    path: str  # the .npz file
    sha256: str  # of the file, recorded in metrics.json
    mu: np.ndarray  # (2048,) float64
    sigma: np.ndarray  # (2048, 2048) float64
    mu_s: np.ndarray | None = None  # (2023,) float64, sFID
    sigma_s: np.ndarray | None = None  # (2023, 2023) float64, sFID
    images: NpzImages | None = None  # streamed arr_0, for precision/recall and KID
    pool: np.ndarray | None = None  # arr_0_pool, features of arr_0 from a known network
    meta: dict = field(default_factory=dict)  # argen_meta of files built here
    keys: list = field(default_factory=list)  # every array name in the file

    @property
    def image_size(self) -> tuple[int, int] | None:
        if self.images is not None:
            return self.images.image_size
        size = self.meta.get("image_size")
        return tuple(size) if size else None

    def describe(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "keys": self.keys,
                "num_images_arr_0": self.images.count if self.images is not None else None,
                "image_size": list(self.image_size) if self.image_size else None,
                "built_by_argen": bool(self.meta), "note": self.meta.get("note"),
                "num_images_stats": self.meta.get("num_images")}


def _read(npz, path, key: str) -> np.ndarray:
    """One array of an open .npz; zipfile and numpy report a damaged member (bad CRC, cut short)
    without naming the file, so it is named here."""
    try:
        return np.asarray(npz[key])
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read '{key}' ({type(e).__name__}: {e}); the file is "
                         f"damaged: {REBUILD}") from None


def _require_finite(x: np.ndarray, path, key: str) -> None:
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: '{key}' has non-finite values (NaN or inf); {REBUILD}")


def _stats_pair(npz, path: str, mu_key: str, sigma_key: str, dim: int):
    mu, sigma = _read(npz, path, mu_key), _read(npz, path, sigma_key)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"{path}: '{mu_key}' has shape {mu.shape} and '{sigma_key}' {sigma.shape}; "
                         f"expected ({dim},) and ({dim}, {dim}); {REBUILD}")
    for key, x in ((mu_key, mu), (sigma_key, sigma)):
        _require_finite(x, path, key)
    return mu.astype(np.float64), sigma.astype(np.float64)


def _meta(npz, path) -> dict:
    try:
        return json.loads(str(_read(npz, path, "argen_meta")))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: 'argen_meta' is not valid JSON ({e}); {REBUILD}") from None


def load_reference(path: str | Path) -> Reference:
    """Read and check a reference .npz; statistics come back as float64, and nothing in it is
    NaN or inf (a NaN would turn into a NaN metric, which reads like a result)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"reference statistics {path} not found; {HOW_TO_GET_REF}")
    require_npz(path, HOW_TO_GET_REF)
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz ({e}); {HOW_TO_GET_REF}") from None
    with npz:
        keys = sorted(npz.files)
        if "mu" not in keys or "sigma" not in keys:
            raise KeyError(f"{path}: reference needs 'mu' and 'sigma' (pool_3 statistics); the file "
                           f"has {keys}; {HOW_TO_GET_REF}")
        ref = Reference(str(path), sha256_file(path), *_stats_pair(npz, str(path), "mu", "sigma", POOL_DIM),
                        keys=keys)
        if ("mu_s" in keys) != ("sigma_s" in keys):
            raise KeyError(f"{path}: has only one of 'mu_s'/'sigma_s'; sFID needs both. {REBUILD}")
        if "mu_s" in keys:
            ref.mu_s, ref.sigma_s = _stats_pair(npz, str(path), "mu_s", "sigma_s", SPATIAL_DIM)
        if "argen_meta" in keys:
            ref.meta = _meta(npz, path)
        if "arr_0_pool" in keys:
            ref.pool = _read(npz, path, "arr_0_pool").astype(np.float32)
            _require_finite(ref.pool, path, "arr_0_pool")
    if "arr_0" in keys:
        ref.images = NpzImages(path)
        if ref.pool is not None and ref.pool.shape != (ref.images.count, POOL_DIM):
            raise ValueError(f"{path}: 'arr_0_pool' has shape {ref.pool.shape}, expected "
                             f"({ref.images.count}, {POOL_DIM}); {REBUILD}")
    return ref


def reference_pool_features(ref: Reference, extractor: InceptionExtractor, batch_size: int = 64,
                            progress: bool = True) -> np.ndarray:
    """Pool features of the reference images: stored ones if the same network made them."""
    if ref.images is None:
        raise KeyError(f"{ref.path}: no 'arr_0' reference images")
    if ref.pool is not None and ref.meta.get("weights", {}).get("fingerprint") == extractor.info.fingerprint:
        return ref.pool
    feats = extractor.extract(ref.images.batches(batch_size), total=ref.images.count, spatial=False,
                              desc="reference features", progress=progress)
    return feats.pool


def build_reference(source: ImageSource, out: str | Path, extractor: InceptionExtractor,
                    keep_images: int = 10000, seed: int = 0, batch_size: int = 64,
                    progress: bool = True, resolution: int = 0) -> dict:
    """Statistics of every image of `source` plus a random subset of `keep_images` of them as
    `arr_0` (ADM keeps 10k for precision/recall); writes `out` atomically, returns the meta.

    Statistics are accumulated per batch, so memory does not grow with the number of images.
    """
    t0 = time.time()
    n = len(source)
    require_two_images(source)
    keep = np.sort(np.random.default_rng(seed).choice(n, min(keep_images, n), replace=False))
    pool_stats, spatial_stats = RunningGaussian(POOL_DIM), RunningGaussian(SPATIAL_DIM)
    kept_images, kept_pool, start = [], [], 0
    with tqdm(total=n, desc="reference statistics", unit="img", disable=not progress) as bar:
        for batch in source.batches(batch_size):
            out_batch = extractor.forward_batch(batch)
            pool = out_batch["pool"].numpy()
            pool_stats.update(pool)
            spatial_stats.update(out_batch["spatial"].numpy())
            mine = keep[(keep >= start) & (keep < start + len(batch))] - start
            kept_images.append(batch[mine])
            kept_pool.append(pool[mine])
            start += len(batch)
            bar.update(len(batch))
    (mu, sigma), (mu_s, sigma_s) = pool_stats.finalize(), spatial_stats.finalize()
    for key, x in (("mu", mu), ("sigma", sigma), ("mu_s", mu_s), ("sigma_s", sigma_s)):
        if not np.isfinite(x).all():
            raise ValueError(f"reference statistic '{key}' is not finite; check the images")
    labels = source.labels
    meta = {"format": FORMAT, "version": VERSION, "source": source.describe(),
            "num_images": n, "image_size": list(source.image_size),
            "crop": f"ADM center crop to {resolution}" if resolution else "none",
            "class_names": source.class_names,
            "class_histogram": np.bincount(labels).tolist() if labels is not None else None,
            "kept_images": len(keep), "seed": seed, "weights": vars(extractor.info),
            "note": SELF_COMPUTED_NOTE, "build_seconds": round(time.time() - t0, 1)}
    arrays = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s,
              "argen_meta": np.array(json.dumps(meta))}
    if len(keep):
        arrays.update(arr_0=np.concatenate(kept_images), arr_0_pool=np.concatenate(kept_pool))
        if labels is not None:
            arrays["arr_1"] = labels[keep]
    with atomic_path(out) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no suffix
        np.savez(f, **arrays)
    return meta


def _same_build(out: Path, meta: dict) -> bool:
    """Whether `out` was built from the same files with the same settings and network."""
    if not out.is_file() or meta["source"]["path"] is None:  # arrays: no identity to compare
        return False
    try:
        with np.load(out, allow_pickle=False) as npz:
            old = json.loads(str(npz["argen_meta"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # damaged: rebuild it
        return False
    keys = ("source", "crop", "kept_images", "seed")
    return all(old.get(k) == meta[k] for k in keys) and \
        old.get("weights", {}).get("fingerprint") == meta["weights"]["fingerprint"]


def make_reference(images, out: str | Path, *, resolution: int = 0, labels=None,
                   keep_images: int = 10000, extractor: InceptionExtractor | None = None,
                   weights: str | None = None, device: str = "auto", batch_size: int = 64,
                   num_workers: int = 2, seed: int = 0, progress: bool = True,
                   force: bool = False) -> dict:
    """`build_reference` from anything `open_images` takes (a uint8 NHWC array, a folder, an
    .npz); `resolution` > 0 ADM-center-crops every image first (ImageNet class folders).

    An `out` already built from the same files, settings and network is kept (meta["skipped"]
    is True) unless `force`, so a re-run pipeline does not redo it.
    """
    source = open_images(images, labels=labels, resolution=resolution, num_workers=num_workers)
    require_two_images(source)  # before the network loads
    extractor = extractor or InceptionExtractor(weights, device)
    planned = {"source": json.loads(json.dumps(source.describe())),
               "crop": f"ADM center crop to {resolution}" if resolution else "none",
               "kept_images": min(keep_images, len(source)), "seed": seed,
               "weights": vars(extractor.info)}
    if not force and _same_build(Path(out), planned):
        return {**load_reference(out).meta, "skipped": True}
    return build_reference(source, out, extractor, keep_images, seed, batch_size, progress, resolution)
