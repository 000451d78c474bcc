"""Cache a dataset's tokenizer codes (image + horizontal flip) for generator training.

    python -m tokenizer.encode data.root=DIR data.resolution=32 tokenizer=RUN/vq.safetensors out=DIR
    torchrun --nproc_per_node=N -m tokenizer.encode ...   (rank r encodes shards k % N == r)

OUT's layout is in tokenizer/cache.py (read by the generator's data loader through `read_meta`).
Shard k is made from dataset items [k*shard_size, (k+1)*shard_size) of the sorted file list. A
re-run redoes exactly the shards whose record does not match what they would be made from now,
so an interrupted run resumes by running the same command again, and deleting a file redoes
the shards from that file on (earlier shards are kept). With skip_bad_images=true, images that
cannot be decoded are left out of their shard and listed in meta.json "skipped".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from common.config import ConfigError, check_fields, run_cli
from common.dist import barrier, cleanup, get_logger, init_distributed
from common.io import sha256_file
from dataset.folder import ClassFolderDataset
from dataset.images import ImageReadError
from tokenizer import load_tokenizer, read_tokenizer_config
from tokenizer.cache import (VARIANTS, Span, build_meta, check_settings, file_stamp, plan_shards,
                             relative_names, shard_done, stale_files, write_meta, write_shard)


@dataclass
class EncodeDataConfig:
    root: str = "???"  # class-folder dataset root (root/<class>/<images>)
    resolution: int = 256  # images are center-cropped to this side before encoding

    def validate(self) -> None:
        check_fields(self, "data.", {"resolution": ">= 1"})
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
        check_fields(self, "", {"batch_size": ">= 1", "shard_size": ">= 1", "num_workers": ">= 0",
                                "device": ("auto", "cpu", "cuda")})
        if not Path(self.tokenizer).is_file():
            raise ConfigError(f"tokenizer={self.tokenizer} not found; train one with `python -m "
                              f"tokenizer.train` or pass the .safetensors file it wrote")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"out={self.out} is a file; pass a folder for the code cache")


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
            records = [{"file": names[i], **file_stamp(Path(dataset.samples[i][0]))}
                       for i in skipped]
            write_shard(Path(cfg.out), span, settings, codes, labels, records)


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
    meta, captions = build_meta(out, dataset, names, spans, cfg.data.root, cfg.data.resolution,
                                tok, grid, codebook_size)
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


if __name__ == "__main__":
    main()
