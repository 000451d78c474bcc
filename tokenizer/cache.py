"""The cache's format: shard files and their records, meta.json, and its validation.

`tokenizer.encode` writes a cache; `ar.data.CodeCache` (discrete codes), `ar.data.ScaleCodeCache`
(per-scale codes) and `ar.data.LatentCache` (continuous latents) read one through `read_meta`.
Layout of a cache folder:
    meta.json            written last, so its presence means the cache is complete; its
                         "fingerprint" hashes every shard's data and labels (what a training
                         run records, to refuse a resume on other data); "kind" is
                         "discrete" (codebook_size), "multiscale" (codebook_size, scales: the
                         side of each scale's code map, coarse to fine) or "continuous"
                         (channels, latent_scale, latent_shift: the generator sees
                         (sample - shift) * scale)
    encode_config.json   the settings the folder was made with; a re-run must match them
    codes_KKKKK.npy      discrete: uint16 (n, 2, h*w): variant 0 the image, 1 its horizontal
                         flip, raster order; multiscale: uint16 (n, 2, L), every scale's codes
                         concatenated coarse to fine (L = sum of scales^2), each row-major
    moments_KKKKK.npy    continuous: float16 (n, 2, 2C, h, w): the posterior's mean (C channels)
                         then log-variance (C, unclamped), for the image and its flip
    labels_KKKKK.npy     int64 (n,)
    shard_KKKKK.json     what shard k was made from: the settings, the sha256 of its file list
                         (label + path relative to data.root, in dataset order) and of the
                         files' sizes and modification times, skipped files, and the sha256 of
                         the data and labels it holds
    captions.jsonl       {"index": i, "caption": ...} per cached image, if the dataset has captions
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.io import atomic_save_npy, atomic_write_text, make_folder
from dataset.folder import ClassFolderDataset, file_stamp

FORMAT, VERSION = "argen-code-cache", 1
VARIANTS = ["original", "hflip"]
# kind -> the prefix of its data files, which is also their key in meta.json's shard list
DATA_FILE = {"discrete": "codes", "multiscale": "codes", "continuous": "moments"}
ENCODE_COMMAND = "python -m tokenizer.encode data.root=... data.resolution=... tokenizer=... out=..."


# ------------------------------------------------------------------------------ shard records

def shard_name(k: int, kind: str = "discrete") -> tuple[str, str]:
    """(data file, labels file) of shard k."""
    return f"{DATA_FILE[kind]}_{k:05d}.npy", f"labels_{k:05d}.npy"


def record_name(k: int) -> str:
    return f"shard_{k:05d}.json"


@dataclass(frozen=True)
class Span:
    """Shard k: dataset items [lo, hi), identified by the sha256 of their (label, file) list
    and of their files' sizes and modification times (an image rewritten under its name)."""

    k: int
    lo: int
    hi: int
    files_sha256: str
    stamps_sha256: str


def relative_names(dataset: ClassFolderDataset) -> list[str]:
    """Each image's path relative to the dataset root, '/'-separated (what meta.json lists)."""
    return [dataset.relative_name(i) for i in range(len(dataset))]


def plan_shards(dataset: ClassFolderDataset, shard_size: int) -> list[Span]:
    spans = []
    for k in range(math.ceil(len(dataset) / shard_size)):
        lo, hi = k * shard_size, min(len(dataset), (k + 1) * shard_size)
        spans.append(Span(k, lo, hi, dataset.files_sha256(lo, hi), dataset.stamps_sha256(lo, hi)))
    return spans


def read_record(out: Path, k: int) -> dict | None:
    try:
        record = json.loads((out / record_name(k)).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def open_array(path: Path, mmap: bool = True) -> np.ndarray:
    """np.load (memory-mapped by default), naming a truncated or corrupt file and the encode
    run that repairs it (a re-run re-checks every file it made and redoes the broken ones)."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is truncated or corrupt ({reason}); re-run the encode command "
                         f"that made the cache (`{ENCODE_COMMAND}`): it re-checks its files and "
                         f"redoes the broken ones") from None


def array_sha256(array: np.ndarray) -> str:
    """Hash of an array's dtype, shape and values: what a shard holds, whatever file it is in."""
    h = hashlib.sha256(f"{array.dtype.str}{tuple(array.shape)}".encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def cache_fingerprint(shard_hashes: list[dict]) -> str:
    """One hash of every shard's data and labels, in shard order: the identity of what a
    generator trains on (train_gen.py records it and refuses to resume on another)."""
    text = "".join(f"{h['data']}\t{h['labels']}\n" for h in shard_hashes)
    return hashlib.sha256(text.encode()).hexdigest()


def _skipped_unchanged(root: Path, skipped: list[dict]) -> bool:
    # a skipped file replaced by a good copy (same name) gets its shard redone
    return all(file_stamp(root / s["file"]) == {"size": s["size"], "mtime_ns": s["mtime_ns"]}
               for s in skipped)


def _rows(path: Path) -> tuple | None:
    """Shape of a saved array (read from its header only), or None if unreadable/missing."""
    try:
        return np.load(path, mmap_mode="r").shape
    except (OSError, ValueError):
        return None


def shard_done(out: Path, span: Span, settings: dict, item_shape: tuple, root: Path,
               skip_ok: bool, kind: str = "discrete") -> bool:
    """Shard files present, complete, and made from exactly what this run would make them from.
    `item_shape`: one variant of one image, (h*w,) codes or (2C, h, w) moments."""
    record = read_record(out, span.k)
    if record is None or record.get("settings") != settings \
            or record.get("files_sha256") != span.files_sha256 \
            or record.get("stamps_sha256", span.stamps_sha256) != span.stamps_sha256:
        return False
    skipped = record.get("skipped", [])
    # a run without skip_bad_images redoes a shard with skipped files, and so names them
    if skipped and not (skip_ok and _skipped_unchanged(root, skipped)):
        return False
    n = record.get("count")
    data, labels = shard_name(span.k, kind)
    return _rows(out / data) == (n, len(VARIANTS), *item_shape) and _rows(out / labels) == (n,)


def write_shard(out: Path, span: Span, settings: dict, codes: np.ndarray, labels: np.ndarray,
                skipped: list[dict], kind: str = "discrete") -> None:
    """Write shard k: `codes` are the codes or moments (n, 2, ...) of its readable images."""
    data, labels_file = shard_name(span.k, kind)
    # meta.json goes first: from now until the end of the run the cache is not complete
    (out / "meta.json").unlink(missing_ok=True)
    # the data file is the shard's commit mark, so it goes before the record changes and comes
    # back last: a kill in between leaves a shard that is not done, never a mismatched one
    (out / data).unlink(missing_ok=True)
    atomic_save_npy(out / labels_file, labels)
    record = {"settings": settings, "files": span.hi - span.lo, "files_sha256": span.files_sha256,
              "stamps_sha256": span.stamps_sha256, "count": len(labels), "skipped": skipped,
              "sha256": {"data": array_sha256(codes), "labels": array_sha256(labels)}}
    atomic_write_text(out / record_name(span.k), json.dumps(record, indent=1) + "\n")
    atomic_save_npy(out / data, codes)


_SHARD_FILE = re.compile(r"^(?:codes|moments|labels)_(\d{5,})\.npy$|^shard_(\d{5,})\.json$")
_OUR_TEMP = re.compile(r"^\.(?:(?:codes|moments|labels)_\d+\.npy|shard_\d+\.json|meta\.json|"
                       r"captions\.jsonl|encode_config\.json)\..+\.tmp$")


def stale_files(out: Path, num_shards: int) -> list[Path]:
    """Shards beyond the current count (the dataset shrank) and temp files of killed writes."""
    stale = []
    for p in sorted(out.iterdir()) if out.is_dir() else []:
        m = _SHARD_FILE.match(p.name)
        if (m and int(m.group(1) or m.group(2)) >= num_shards) or _OUR_TEMP.match(p.name):
            stale.append(p)
    return stale


def check_settings(out: Path, settings: dict, is_main: bool) -> bool:
    """Refuse to mix shards made with other settings; record them on a fresh folder. Returns
    whether encode_config.json was written."""
    path = out / "encode_config.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"{path} is corrupt; delete it and run the same command again "
                             f"(each shard's record is checked, so only matching shards are "
                             f"kept)") from None
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: folder has {a!r}, this run {b!r}"
                               for k, (a, b) in diff.items())
            raise ValueError(f"{out} holds a code cache made with different settings "
                             f"({detail}). Use a new out= folder, or delete {out} to rebuild it.")
    if not is_main:
        return False
    make_folder(out)
    # also drops keys older versions kept ("count"); a no-op when the file is identical
    return atomic_write_text(path, json.dumps(settings, indent=1) + "\n")


# ------------------------------------------------------------------------------ meta.json

def build_meta(out: Path, dataset: ClassFolderDataset, names: list[str], spans: list[Span],
               root: str, resolution: int, tok: dict, grid, facts: dict) -> tuple[dict, list | None]:
    """meta.json and the captions of the cached images, read from the finished shards on disk
    (other ranks wrote some of them). `facts`: the kind and its fields (see make_meta)."""
    kind = facts["kind"]
    records = [read_record(out, s.k) for s in spans]
    skipped = [e["file"] for r in records for e in r["skipped"]]
    labels = np.concatenate([np.load(out / shard_name(s.k)[1]) for s in spans])
    if len(labels) == 0:
        raise ValueError(f"none of the {len(names)} images of data.root={root} could be "
                         f"read (all skipped, listed in {out}/shard_*.json); check the dataset")
    shards = [{DATA_FILE[kind]: shard_name(s.k, kind)[0], "labels": shard_name(s.k)[1],
               "count": r["count"], "sha256": r.get("sha256") or _hash_shard(out, s.k, kind)}
              for s, r in zip(spans, records)]
    captions = None
    if dataset.captions is not None:
        gone = set(skipped)
        captions = [c for c, name in zip(dataset.captions, names) if name not in gone]
    meta = make_meta(tok, resolution, grid, facts, labels, list(dataset.classes), shards,
                     captions is not None, str(Path(root).resolve()), skipped)
    return meta, captions


def _hash_shard(out: Path, k: int, kind: str) -> dict:
    """The hashes of a shard written before records kept them."""
    data, labels = shard_name(k, kind)
    return {"data": array_sha256(np.load(out / data, mmap_mode="r")),
            "labels": array_sha256(np.load(out / labels))}


def make_meta(tok: dict, resolution: int, grid, facts: dict, labels: np.ndarray,
              class_names: list[str], shards: list[dict], has_captions: bool, source: str,
              skipped: list[str]) -> dict:
    """meta.json's content: the one definition of the cache's metadata (the encoder writes it,
    `read_meta` checks it, tests build caches with it). `facts` holds the kind and the fields a
    reader of that kind needs: {"kind": "discrete", "codebook_size": V}, {"kind": "multiscale",
    "codebook_size": V, "scales": [pn_0, ...]} or {"kind": "continuous", "channels": C,
    "latent_scale": s, "latent_shift": b}."""
    return {"format": FORMAT, "version": VERSION, **facts, "tokenizer": tok,
            "resolution": resolution, "grid": list(grid), "variants": VARIANTS,
            "count": len(labels), "num_classes": len(class_names),
            "class_names": class_names,
            "label_histogram": np.bincount(labels, minlength=len(class_names)).tolist(),
            "shards": shards, "captions": "captions.jsonl" if has_captions else None,
            "source": source, "skipped": skipped,
            **({"fingerprint": cache_fingerprint([s["sha256"] for s in shards])}
               if all("sha256" in s for s in shards) else {})}


def write_meta(out: Path, meta: dict, captions: list[str] | None) -> bool:
    """Write captions.jsonl, then meta.json (the completion mark); returns whether any file
    changed (a file that already holds the same text is left untouched)."""
    changed = False
    if captions is not None:
        lines = "".join(json.dumps({"index": i, "caption": c}) + "\n"
                        for i, c in enumerate(captions))
        changed = atomic_write_text(out / "captions.jsonl", lines)
    elif (out / "captions.jsonl").is_file():  # the dataset's captions file was removed
        (out / "meta.json").unlink(missing_ok=True)
        (out / "captions.jsonl").unlink()
        changed = True
    return atomic_write_text(out / "meta.json", json.dumps(meta, indent=1) + "\n") or changed


REQUIRED = ("format", "version", "kind", "tokenizer", "resolution", "grid", "count",
            "num_classes", "class_names", "shards", "variants")
KIND_FIELDS = {"discrete": ("codebook_size",), "multiscale": ("codebook_size", "scales"),
               "continuous": ("channels", "latent_scale")}


def _check_kind(meta: dict, path: Path) -> None:
    """The kind and the facts a reader of that kind relies on."""
    kind = meta["kind"]
    if kind not in DATA_FILE:
        raise ValueError(f"{path}: kind {kind!r} is not one of {sorted(DATA_FILE)}; "
                         f"re-create the cache")
    bad = []
    size = meta.get("codebook_size")
    if kind != "continuous" and not (isinstance(size, int) and size > 0):
        bad.append(f"codebook_size={meta['codebook_size']!r}")
    if kind == "multiscale":
        scales = meta["scales"]
        if not (isinstance(scales, list) and scales and all(isinstance(p, int) and p > 0 for p in scales)
                and all(a < b for a, b in zip(scales, scales[1:])) and scales[-1] == meta["grid"][0]):
            bad.append(f"scales={scales!r} (with grid {meta['grid']})")
    if kind == "continuous":
        if not (isinstance(meta["channels"], int) and meta["channels"] > 0):
            bad.append(f"channels={meta['channels']!r}")
        for key in ("latent_scale", "latent_shift"):
            value = meta.get(key, 0.0)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or \
                    (key == "latent_scale" and value <= 0):
                bad.append(f"{key}={value!r}")
    if bad:
        raise ValueError(f"{path}: {', '.join(bad)} is not valid for a {kind} cache; re-create "
                         f"it with the encode command")


def read_meta(cache_dir: str | Path) -> dict:
    """Validated meta.json of a complete code cache, with a clear error for anything else."""
    d = Path(cache_dir)
    how = f"create it with `{ENCODE_COMMAND}`"
    if not d.is_dir():
        raise FileNotFoundError(f"code cache folder {d} not found; {how}")
    path = d / "meta.json"
    if not path.is_file():
        if (d / "encode_config.json").is_file() or any(d.glob("codes_*.npy")) \
                or any(d.glob("moments_*.npy")):
            raise ValueError(f"code cache {d} is incomplete (no meta.json): the encode run was "
                             f"interrupted. Re-run the same `python -m tokenizer.encode` command "
                             f"to finish it; finished shards are kept.")
        raise FileNotFoundError(f"{d} has no meta.json and is not a code cache; {how}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete {d} and re-run the encode command") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = (meta.get("format"), meta.get("version")) if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{path}: expected format {FORMAT!r} version {VERSION}, found {found}; "
                         f"re-create the cache with this version's encode command")
    missing = [k for k in REQUIRED + KIND_FIELDS.get(meta["kind"], ()) if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}; re-create the cache")
    _check_kind(meta, path)
    data = DATA_FILE[meta["kind"]]
    if any(not isinstance(s, dict) or data not in s or "labels" not in s for s in meta["shards"]):
        raise ValueError(f"{path}: a {meta['kind']} cache lists its shards as {{'{data}': ..., "
                         f"'labels': ...}}, and these do not; re-create the cache")
    absent = [f for s in meta["shards"] for f in (s[data], s["labels"]) if not (d / f).is_file()]
    if absent:
        raise ValueError(f"code cache {d} is incomplete: {absent[:4]} missing; re-run the encode "
                         f"command that made it")
    return meta
