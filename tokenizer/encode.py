"""Cache a dataset's tokenizer codes (image + horizontal flip) for generator training.

    python -m tokenizer.encode data.root=DIR data.resolution=32 tokenizer=RUN/vq.safetensors out=DIR
    torchrun --nproc_per_node=N -m tokenizer.encode ...   (rank r encodes shards k % N == r)

Layout of OUT (read by the generator's data loader; `read_meta` validates it):
    meta.json            written last, so its presence means the cache is complete
    encode_config.json   the settings the folder was made with; a re-run must match them
    codes_KKKKK.npy      uint16 (n, 2, h*w): variant 0 the image, 1 its horizontal flip, raster order
    labels_KKKKK.npy     int64 (n,)
    shard_KKKKK.json     what shard k was made from: the settings, the sha256 of its file list
                         (label + path relative to data.root, in dataset order), skipped files
    captions.jsonl       {"index": i, "caption": ...} per cached image, if the dataset has captions
Shard k is made from dataset items [k*shard_size, (k+1)*shard_size) of the sorted file list. A
re-run redoes exactly the shards whose record does not match what they would be made from now,
so an interrupted run resumes by running the same command again, and deleting a file redoes
the shards from that file on (earlier shards are kept). With skip_bad_images=true, images that
cannot be decoded are left out of their shard and listed in meta.json "skipped".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ar.config import ConfigError, run_cli
from ar.dist import barrier, cleanup, get_logger, init_distributed
from ar.io import atomic_path, atomic_write_text, sha256_file
from dataset.folder import ClassFolderDataset
from dataset.images import ImageReadError
from tokenizer import load_tokenizer, read_tokenizer_config

FORMAT, VERSION = "argen-code-cache", 1
VARIANTS = ["original", "hflip"]
ENCODE_COMMAND = "python -m tokenizer.encode data.root=... data.resolution=... tokenizer=... out=..."
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EncodeDataConfig:
    root: str = "???"  # class-folder dataset root (root/<class>/<images>)
    resolution: int = 256  # images are center-cropped to this side before encoding

    def validate(self) -> None:
        if self.resolution < 1:
            raise ConfigError(f"data.resolution={self.resolution}: must be >= 1 (pixels)")
        if not Path(self.root).is_dir():
            what = "is a file, not a folder" if Path(self.root).exists() else "not found"
            raise ConfigError(f"data.root={self.root} {what}; create a dataset with `python -m "
                              f"dataset.shapes` or pass a class-folder dataset "
                              f"(root/<class_name>/<images>)")


@dataclass
class EncodeConfig:
    data: EncodeDataConfig = field(default_factory=EncodeDataConfig)  # images to encode
    tokenizer: str = "???"  # tokenizer weights (.safetensors written by tokenizer.train)
    out: str = "???"  # cache folder to write
    batch_size: int = 128  # images per encoder forward (each is also encoded flipped)
    # A kill loses at most the shard in progress: the quickstart encodes 8,000 32-px images in
    # ~21 s on a CPU, so a 1000-image shard is ~3 s there, and a minute even in a 20x slower setup.
    shard_size: int = 1000  # images per shard file: the unit of resumption (a kill loses one)
    num_workers: int = 2  # DataLoader workers decoding images
    device: str = "auto"  # "auto", "cpu" or "cuda"
    skip_bad_images: bool = False  # leave out unreadable images (listed in meta.json), don't stop

    def validate(self) -> None:
        for key, low in (("batch_size", 1), ("shard_size", 1), ("num_workers", 0)):
            if getattr(self, key) < low:
                raise ConfigError(f"{key}={getattr(self, key)}: must be >= {low}")
        if self.device not in DEVICES:
            raise ConfigError(f"device={self.device!r}: choose one of {', '.join(DEVICES)}")
        if not Path(self.tokenizer).is_file():
            raise ConfigError(f"tokenizer={self.tokenizer} not found; train one with `python -m "
                              f"tokenizer.train` or pass the .safetensors file it wrote")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"out={self.out} is a file; pass a folder for the code cache")


# ------------------------------------------------------------------------------ shard records

def shard_name(k: int) -> tuple[str, str]:
    return f"codes_{k:05d}.npy", f"labels_{k:05d}.npy"


def record_name(k: int) -> str:
    return f"shard_{k:05d}.json"


@dataclass(frozen=True)
class Span:
    """Shard k: dataset items [lo, hi), identified by the sha256 of their (label, file) list."""

    k: int
    lo: int
    hi: int
    files_sha256: str


def relative_names(dataset: ClassFolderDataset) -> list[str]:
    """Each image's path relative to the dataset root, '/'-separated (what meta.json lists)."""
    return [os.path.relpath(p, dataset.root).replace(os.sep, "/") for p, _ in dataset.samples]


def plan_shards(dataset: ClassFolderDataset, names: list[str], shard_size: int) -> list[Span]:
    # Labels are in the hash because adding a class folder renumbers the labels of unchanged files.
    spans = []
    for k in range(math.ceil(len(names) / shard_size)):
        lo, hi = k * shard_size, min(len(names), (k + 1) * shard_size)
        text = "".join(f"{dataset.samples[i][1]}\t{names[i]}\n" for i in range(lo, hi))
        spans.append(Span(k, lo, hi, hashlib.sha256(text.encode()).hexdigest()))
    return spans


def read_record(out: Path, k: int) -> dict | None:
    try:
        record = json.loads((out / record_name(k)).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _file_stamp(path: Path) -> dict:
    try:
        st = path.stat()
    except OSError:
        return {"size": None, "mtime_ns": None}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _skipped_unchanged(root: Path, skipped: list[dict]) -> bool:
    # a skipped file replaced by a good copy (same name) gets its shard redone
    return all(_file_stamp(root / s["file"]) == {"size": s["size"], "mtime_ns": s["mtime_ns"]}
               for s in skipped)


def _rows(path: Path) -> tuple | None:
    """Shape of a saved array (read from its header only), or None if unreadable/missing."""
    try:
        return np.load(path, mmap_mode="r").shape
    except (OSError, ValueError):
        return None


def shard_done(out: Path, span: Span, settings: dict, tokens: int, root: Path,
               skip_ok: bool) -> bool:
    """Shard files present, complete, and made from exactly what this run would make them from."""
    record = read_record(out, span.k)
    if record is None or record.get("settings") != settings \
            or record.get("files_sha256") != span.files_sha256:
        return False
    skipped = record.get("skipped", [])
    # a run without skip_bad_images redoes a shard with skipped files, and so names them
    if skipped and not (skip_ok and _skipped_unchanged(root, skipped)):
        return False
    n = record.get("count")
    codes, labels = shard_name(span.k)
    return _rows(out / codes) == (n, len(VARIANTS), tokens) and _rows(out / labels) == (n,)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would add .npy
        np.save(f, array)


def write_shard(out: Path, span: Span, settings: dict, codes: np.ndarray, labels: np.ndarray,
                skipped: list[dict]) -> None:
    # meta.json goes first: from now until the end of the run the cache is not complete
    (out / "meta.json").unlink(missing_ok=True)
    # the codes file is the shard's commit mark, so it goes before the record changes and comes
    # back last: a kill in between leaves a shard that is not done, never a mismatched one
    (out / shard_name(span.k)[0]).unlink(missing_ok=True)
    _save_npy(out / shard_name(span.k)[1], labels)
    record = {"settings": settings, "files": span.hi - span.lo, "files_sha256": span.files_sha256,
              "count": len(labels), "skipped": skipped}
    atomic_write_text(out / record_name(span.k), json.dumps(record, indent=1) + "\n")
    _save_npy(out / shard_name(span.k)[0], codes)


_SHARD_FILE = re.compile(r"^(?:codes|labels)_(\d{5,})\.npy$|^shard_(\d{5,})\.json$")
_OUR_TEMP = re.compile(r"^\.(?:(?:codes|labels)_\d+\.npy|shard_\d+\.json|meta\.json|"
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
    out.mkdir(parents=True, exist_ok=True)
    # also drops keys older versions kept ("count"); a no-op when the file is identical
    return atomic_write_text(path, json.dumps(settings, indent=1) + "\n")


# ------------------------------------------------------------------------------ encoding

class _Guarded(Dataset):
    """Items (image, index, error): an unreadable image comes back as its error message, so the
    main process reports the file itself (a DataLoader worker would wrap the exception in its
    own traceback) and can leave it out of the batch."""

    def __init__(self, dataset: ClassFolderDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        try:
            return self.dataset[i][0], i, ""
        except ImageReadError as e:
            error = str(e)
        except FileNotFoundError as e:
            error = f"{e}: it was removed after this run listed the folder; running the same " \
                    f"command again lists it anew."
        r = self.dataset.resolution
        return torch.zeros(3, r, r), i, error  # a placeholder, left out of the batch


def bad_image_error(message: str) -> ImageReadError:
    return ImageReadError(f"{message.rstrip('. ')}. To encode the other images without it, pass "
                          f"skip_bad_images=true (skipped files are listed in meta.json); "
                          f"finished shards are kept.")


@torch.no_grad()
def encode_span(model, dataset, span: Span, cfg: EncodeConfig, device, bar,
                tokens: int) -> tuple[np.ndarray, list[int]]:
    """Codes of the readable items of the span and of their mirror images, uint16 (n, 2, h*w),
    and the indices of the items left out (only with skip_bad_images)."""
    loader = DataLoader(Subset(_Guarded(dataset), range(span.lo, span.hi)),
                        batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda")
    parts, skipped = [np.empty((0, len(VARIANTS), tokens), np.uint16)], []
    for x, index, errors in loader:
        bad = [j for j, e in enumerate(errors) if e]
        if bad and not cfg.skip_bad_images:
            raise bad_image_error(errors[bad[0]])
        skipped += [int(index[j]) for j in bad]
        keep = torch.tensor([not e for e in errors])
        x = x[keep].to(device, non_blocking=True)
        if len(x):
            codes = model.encode(torch.cat([x, x.flip(-1)]))  # (2B, h, w): originals then flips
            codes = codes.view(2, len(x), -1).transpose(0, 1)  # (B, 2, h*w), raster order
            parts.append(codes.cpu().numpy().astype(np.uint16))
        bar.update(len(errors))
    return np.concatenate(parts), skipped


def encode_shards(model, dataset: ClassFolderDataset, names: list[str], spans: list[Span],
                  settings: dict, cfg: EncodeConfig, device, tokens: int, show: bool, log) -> None:
    """Encode and write the shard of each span (the spans this process was given)."""
    # `with`: an error closes the bar first, so the error line starts a line of its own
    with tqdm(total=sum(s.hi - s.lo for s in spans), disable=not show, desc="encode",
              unit="img", dynamic_ncols=True) as bar:
        for span in spans:
            codes, skipped = encode_span(model, dataset, span, cfg, device, bar, tokens)
            left_out = set(skipped)
            labels = np.array([dataset.samples[i][1] for i in range(span.lo, span.hi)
                               if i not in left_out], dtype=np.int64)
            for i in skipped:
                log.warning(f"skipped unreadable image {names[i]} (skip_bad_images=true)")
            records = [{"file": names[i], **_file_stamp(Path(dataset.samples[i][0]))}
                       for i in skipped]
            write_shard(Path(cfg.out), span, settings, codes, labels, records)


# ------------------------------------------------------------------------------ meta.json

def build_meta(out: Path, dataset: ClassFolderDataset, names: list[str], spans: list[Span],
               cfg: EncodeConfig, tok: dict, grid, codebook_size: int) -> tuple[dict, list | None]:
    """meta.json and the captions of the cached images, read from the finished shards on disk
    (other ranks wrote some of them)."""
    records = [read_record(out, s.k) for s in spans]
    skipped = [e["file"] for r in records for e in r["skipped"]]
    labels = np.concatenate([np.load(out / shard_name(s.k)[1]) for s in spans])
    if len(labels) == 0:
        raise ValueError(f"none of the {len(names)} images of data.root={cfg.data.root} could be "
                         f"read (all skipped, listed in {out}/shard_*.json); check the dataset")
    shards = [{"codes": shard_name(s.k)[0], "labels": shard_name(s.k)[1], "count": r["count"]}
              for s, r in zip(spans, records)]
    captions = None
    if dataset.captions is not None:
        gone = set(skipped)
        captions = [c for c, name in zip(dataset.captions, names) if name not in gone]
    meta = {"format": FORMAT, "version": VERSION, "kind": "discrete", "tokenizer": tok,
            "resolution": cfg.data.resolution, "grid": list(grid), "codebook_size": codebook_size,
            "variants": VARIANTS, "count": len(labels), "num_classes": len(dataset.classes),
            "class_names": list(dataset.classes),
            "label_histogram": np.bincount(labels, minlength=len(dataset.classes)).tolist(),
            "shards": shards, "captions": "captions.jsonl" if captions is not None else None,
            "source": str(Path(cfg.data.root).resolve()), "skipped": skipped}
    return meta, captions


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


# ------------------------------------------------------------------------------ the command

def load_discrete_tokenizer(weights: Path, device):
    model = load_tokenizer(weights, device=device)
    if model.kind != "discrete":
        raise ValueError(f"tokenizer={weights} is a {model.kind} tokenizer; this command caches "
                         f"discrete codes only")
    if model.codebook_size > 65535:
        raise ValueError(f"tokenizer={weights}: codebook size {model.codebook_size} does not fit "
                         f"the cache's uint16 codes (at most 65535)")
    return model


def prepare_folder(out: Path, spans: list[Span], settings: dict, is_main: bool) -> bool:
    """Check the folder's settings; then (main process) remove shards beyond the new count and
    temp files of killed writes. Returns whether any file changed."""
    changed = check_settings(out, settings, is_main)
    if not is_main:
        return changed
    stale = stale_files(out, len(spans))
    if stale:
        (out / "meta.json").unlink(missing_ok=True)  # the cache changes: not complete until the end
    for p in stale:
        p.unlink(missing_ok=True)
    return changed or bool(stale)


def run(cfg: EncodeConfig) -> dict:
    """Encode the shards that are not done, then write meta.json; returns meta.json's content."""
    info = init_distributed(cfg.device)
    log = get_logger("tokenizer.encode", info.rank)
    out, weights, root = Path(cfg.out), Path(cfg.tokenizer).resolve(), Path(cfg.data.root)
    dataset = ClassFolderDataset(root, cfg.data.resolution)
    names = relative_names(dataset)
    model = load_discrete_tokenizer(weights, info.device)
    grid = model.grid(cfg.data.resolution)
    tokens = grid[0] * grid[1]
    # the settings that change every code; which files a shard holds is checked shard by shard
    settings = {"tokenizer_sha256": sha256_file(weights), "data_root": str(root.resolve()),
                "resolution": cfg.data.resolution, "shard_size": cfg.shard_size}
    spans = plan_shards(dataset, names, cfg.shard_size)
    changed = prepare_folder(out, spans, settings, info.is_main)
    barrier()

    todo = [s for s in spans if not shard_done(out, s, settings, tokens, root, cfg.skip_bad_images)]
    mine = [s for s in todo if s.k % info.world_size == info.rank]
    log.info(f"{dataset}: {len(spans)} shards, {len(spans) - len(todo)} already done; "
             f"grid {grid[0]}x{grid[1]}, codebook {model.codebook_size}")
    encode_shards(model, dataset, names, mine, settings, cfg, info.device, tokens,
                  show=info.is_main and bool(todo), log=log)
    barrier()
    meta = {}
    if info.is_main:
        tok = tokenizer_identity(weights, settings["tokenizer_sha256"])
        meta = finish(out, dataset, names, spans, settings, cfg, tok, grid, model.codebook_size,
                      tokens, nothing_done=not todo and not changed, log=log)
    barrier()
    cleanup()
    return meta


def tokenizer_identity(weights: Path, sha: str) -> dict:
    tcfg = read_tokenizer_config(weights)
    return {"name": tcfg.name, "path": str(weights), "sha256": sha,
            "config": dataclasses.asdict(tcfg)}


def finish(out: Path, dataset, names, spans, settings, cfg, tok, grid, codebook_size, tokens,
           nothing_done: bool, log) -> dict:
    """Check every shard, then write meta.json; says so when the cache was already complete."""
    root = Path(cfg.data.root)
    missing = [s.k for s in spans
               if not shard_done(out, s, settings, tokens, root, cfg.skip_bad_images)]
    if missing:
        raise RuntimeError(f"shards {missing} of {out} are missing after encoding (did a rank "
                           f"fail?); re-run the same command to finish them")
    meta, captions = build_meta(out, dataset, names, spans, cfg, tok, grid, codebook_size)
    changed = write_meta(out, meta, captions)
    skipped = f" ({len(meta['skipped'])} unreadable images skipped)" if meta["skipped"] else ""
    if nothing_done and not changed:
        log.info(f"code cache {out} already complete: {meta['count']} images in {len(spans)} "
                 f"shards{skipped}; nothing to do")
    else:
        log.info(f"wrote {meta['count']} x {len(VARIANTS)} code grids in {len(spans)} shards "
                 f"to {out}{skipped}")
    return meta


def main(argv: list[str] | None = None) -> dict:
    """The command: any error ends in one `error: ...` line (SystemExit), as on the command line."""
    return run_cli(run, EncodeConfig, __doc__, argv)


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
