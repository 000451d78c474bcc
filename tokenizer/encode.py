"""Cache a dataset's tokenizer codes (image + horizontal flip) for generator training.

    python -m tokenizer.encode data.root=DIR data.resolution=32 tokenizer=RUN/vq.safetensors out=DIR
    torchrun --nproc_per_node=N -m tokenizer.encode ...   (rank r encodes shards k % N == r)

Layout of OUT (read by the generator's data loader; `read_meta` validates it):
    meta.json            written last, so its presence means the cache is complete
    encode_config.json   the settings the folder was made with; a re-run must match them
    codes_KKKKK.npy      uint16 (n, 2, h*w): variant 0 the image, 1 its horizontal flip, raster order
    labels_KKKKK.npy     int64 (n,)
    captions.jsonl       {"index": i, "caption": ...} per image, only if the dataset has captions
Shard k holds dataset items [k*shard_size, (k+1)*shard_size). Finished shards are skipped, so an
interrupted run resumes by running the same command again.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ar.config import ConfigError, parse_cli
from ar.dist import barrier, cleanup, get_logger, init_distributed
from ar.io import atomic_path, atomic_write_text, sha256_file
from dataset.folder import ClassFolderDataset
from tokenizer import load_tokenizer, read_tokenizer_config

FORMAT, VERSION = "argen-code-cache", 1
VARIANTS = ["original", "hflip"]
ENCODE_COMMAND = "python -m tokenizer.encode data.root=... data.resolution=... tokenizer=... out=..."


@dataclass
class EncodeDataConfig:
    root: str = "???"  # class-folder dataset root (root/<class>/<images>)
    resolution: int = 256  # images are center-cropped to this side before encoding


@dataclass
class EncodeConfig:
    data: EncodeDataConfig = field(default_factory=EncodeDataConfig)  # images to encode
    tokenizer: str = "???"  # tokenizer weights (.safetensors written by tokenizer.train)
    out: str = "???"  # cache folder to write
    batch_size: int = 128  # images per encoder forward (each is also encoded flipped)
    shard_size: int = 10000  # images per shard file
    num_workers: int = 2  # DataLoader workers decoding images
    device: str = "auto"  # "auto", "cpu" or "cuda"

    def validate(self) -> None:
        if self.batch_size < 1 or self.shard_size < 1:
            raise ConfigError("batch_size and shard_size must be >= 1")


def shard_name(k: int) -> tuple[str, str]:
    return f"codes_{k:05d}.npy", f"labels_{k:05d}.npy"


def _rows(path: Path) -> tuple | None:
    """Shape of a saved array (read from its header only), or None if unreadable/missing."""
    try:
        return np.load(path, mmap_mode="r").shape
    except (OSError, ValueError):
        return None


def shard_done(out: Path, k: int, n: int, tokens: int) -> bool:
    codes, labels = shard_name(k)
    return _rows(out / codes) == (n, len(VARIANTS), tokens) and _rows(out / labels) == (n,)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would add .npy
        np.save(f, array)


def check_settings(out: Path, settings: dict, is_main: bool) -> None:
    """Refuse to mix shards made with other settings; record them on a fresh folder."""
    path = out / "encode_config.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError:
            raise SystemExit(f"error: {path} is corrupt; delete {out} and run again") from None
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: folder has {a!r}, this run {b!r}" for k, (a, b) in diff.items())
            raise SystemExit(f"error: {out} holds a code cache made with different settings "
                             f"({detail}). Use a new out= folder, or delete {out} to rebuild it.")
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=1) + "\n")


@torch.no_grad()
def encode_shard(model, dataset, lo: int, hi: int, cfg: EncodeConfig, device, bar) -> np.ndarray:
    """Codes of items [lo, hi) and of their mirror images: uint16 (n, 2, h*w)."""
    loader = DataLoader(Subset(dataset, range(lo, hi)), batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    parts = []
    for x, _ in loader:
        x = x.to(device, non_blocking=True)
        codes = model.encode(torch.cat([x, x.flip(-1)]))  # (2B, h, w): originals then flips
        codes = codes.view(2, len(x), -1).transpose(0, 1)  # (B, 2, h*w), raster order
        parts.append(codes.cpu().numpy().astype(np.uint16))
        bar.update(len(x))
    return np.concatenate(parts)


def write_meta(out: Path, dataset, cfg: EncodeConfig, tok: dict, grid, codebook_size) -> dict:
    n, S = len(dataset), cfg.shard_size
    labels = np.array([label for _, label in dataset.samples], dtype=np.int64)
    shards = [{"codes": shard_name(k)[0], "labels": shard_name(k)[1], "count": min(n, (k + 1) * S) - k * S}
              for k in range(math.ceil(n / S))]
    if dataset.captions is not None:
        lines = "".join(json.dumps({"index": i, "caption": c}) + "\n" for i, c in enumerate(dataset.captions))
        atomic_write_text(out / "captions.jsonl", lines)
    meta = {"format": FORMAT, "version": VERSION, "kind": "discrete", "tokenizer": tok,
            "resolution": cfg.data.resolution, "grid": list(grid), "codebook_size": codebook_size,
            "variants": VARIANTS, "count": n, "num_classes": len(dataset.classes),
            "class_names": list(dataset.classes),
            "label_histogram": np.bincount(labels, minlength=len(dataset.classes)).tolist(),
            "shards": shards, "captions": "captions.jsonl" if dataset.captions is not None else None,
            "source": str(Path(cfg.data.root).resolve())}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv=None) -> dict:
    cfg = parse_cli(EncodeConfig, argv, __doc__)
    info = init_distributed(cfg.device)
    log = get_logger("tokenizer.encode", info.rank)
    out, weights = Path(cfg.out), Path(cfg.tokenizer).resolve()
    dataset = ClassFolderDataset(cfg.data.root, cfg.data.resolution)
    model = load_tokenizer(weights, device=info.device)
    if model.kind != "discrete":
        raise SystemExit(f"error: {weights} is a {model.kind} tokenizer; this command caches "
                         f"discrete codes only")
    if model.codebook_size > 65535:
        raise SystemExit(f"error: codebook size {model.codebook_size} of {weights} does not fit "
                         f"the cache's uint16 codes (at most 65535)")
    grid = model.grid(cfg.data.resolution)
    sha = sha256_file(weights)
    check_settings(out, {"tokenizer_sha256": sha, "data_root": str(Path(cfg.data.root).resolve()),
                         "resolution": cfg.data.resolution, "shard_size": cfg.shard_size,
                         "count": len(dataset)}, info.is_main)
    barrier()

    n, S, tokens = len(dataset), cfg.shard_size, grid[0] * grid[1]
    spans = [(k, k * S, min(n, (k + 1) * S)) for k in range(math.ceil(n / S))]
    todo = [(k, lo, hi) for k, lo, hi in spans if not shard_done(out, k, hi - lo, tokens)]
    if todo and info.is_main:  # the cache is about to change: it is not complete until we finish
        (out / "meta.json").unlink(missing_ok=True)
    mine = [s for s in todo if s[0] % info.world_size == info.rank]
    log.info(f"{dataset}: {len(spans)} shards, {len(spans) - len(todo)} already done; "
             f"grid {grid[0]}x{grid[1]}, codebook {model.codebook_size}")
    bar = tqdm(total=sum(hi - lo for _, lo, hi in mine), disable=not info.is_main,
               desc="encode", unit="img", dynamic_ncols=True)
    for k, lo, hi in mine:
        codes = encode_shard(model, dataset, lo, hi, cfg, info.device, bar)
        labels = np.array([dataset.samples[i][1] for i in range(lo, hi)], dtype=np.int64)
        _save_npy(out / shard_name(k)[1], labels)
        _save_npy(out / shard_name(k)[0], codes)  # written last: a shard is done once both exist
    bar.close()
    barrier()
    meta = {}
    if info.is_main:
        missing = [k for k, lo, hi in spans if not shard_done(out, k, hi - lo, tokens)]
        if missing:
            raise SystemExit(f"error: shards {missing} of {out} are missing after encoding (did "
                             f"a rank fail?); re-run the same command to finish them")
        tcfg = read_tokenizer_config(weights)
        tok = {"name": tcfg.name, "path": str(weights), "sha256": sha,
               "config": dataclasses.asdict(tcfg)}
        meta = write_meta(out, dataset, cfg, tok, grid, model.codebook_size)
        log.info(f"wrote {n} x {len(VARIANTS)} code grids to {out}")
    barrier()
    cleanup()
    return meta


REQUIRED = ("format", "version", "kind", "tokenizer", "resolution", "grid", "count",
            "num_classes", "class_names", "shards", "variants")


def read_meta(cache_dir: str | Path) -> dict:
    """Validated meta.json of a complete code cache, with a clear error for anything else."""
    d = Path(cache_dir)
    how = f"create it with `{ENCODE_COMMAND}`"
    if not d.is_dir():
        raise FileNotFoundError(f"code cache folder {d} not found; {how}")
    path = d / "meta.json"
    if not path.is_file():
        if (d / "encode_config.json").is_file() or any(d.glob("codes_*.npy")):
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
    missing = [k for k in REQUIRED if k not in meta]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}; re-create the cache")
    absent = [f for s in meta["shards"] for f in (s["codes"], s["labels"]) if not (d / f).is_file()]
    if absent:
        raise ValueError(f"code cache {d} is incomplete: {absent[:4]} missing; re-run the encode "
                         f"command that made it")
    return meta


if __name__ == "__main__":
    main()
