"""Cache a dataset's tokenizer outputs (image + horizontal flip) for generator training: codes
for a discrete (VQ) tokenizer, every scale's codes for a multi-scale one (VAR's VQVAE), the
posterior's moments in float16 for a continuous (KL) one.

    python -m tokenizer.encode data.root=DIR data.resolution=32 tokenizer=RUN/vq.safetensors out=DIR
    python -m tokenizer.encode ... tokenizer=RUN/kl.safetensors out=DIR   (or a diffusers VAE folder)
    # text-to-image: also cache the captions, as tokens (bpe | byte) or a frozen encoder's features
    python -m tokenizer.encode ... text.kind=bpe            (or text.kind=encoder text.encoder=FOLDER)
    torchrun --nproc_per_node=N -m tokenizer.encode ...   (rank r encodes shards k % N == r)

With text.kind set, the captions (the dataset's captions.jsonl) are cached in OUT/text/ after the
images (tokenizer/text_cache.py); changing only the text settings remakes that part alone.
A latent cache stores the posterior (mean and log-variance), not one latent, so the generator's
data stream can draw a fresh latent at every visit (MAR's trick; ar/data.py).
OUT's layout is in tokenizer/cache.py (read by the generator's data loader through `read_meta`).
Shard k is made from dataset items [k*shard_size, (k+1)*shard_size) of the sorted file list. A
re-run redoes exactly the shards whose record does not match what they would be made from now,
so an interrupted run resumes by running the same command again, and deleting a file redoes
the shards from that file on (earlier shards are kept). With skip_bad_images=true, images that
cannot be decoded are left out of their shard and listed in meta.json "skipped".
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from common.config import ConfigError, check_fields, run_cli
from common.dist import barrier, cleanup, get_logger, init_distributed
from dataset.folder import ClassFolderDataset, file_stamp
from dataset.images import ImageReadError
from tokenizer import load_tokenizer, read_tokenizer_config, tokenizer_sha256
from tokenizer.cache import (VARIANTS, Span, build_meta, check_settings, plan_shards, relative_names,
                             shard_done, stale_files, write_meta, write_shard)
from tokenizer.text_cache import TextCacheConfig, write_text_cache


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
    tokenizer: str = "???"  # tokenizer weights (.safetensors from tokenizer.train) or a diffusers VAE folder
    out: str = "???"  # cache folder to write
    batch_size: int = 128  # images per encoder forward (each is also encoded flipped)
    # A kill loses at most the shard in progress: the quickstart encodes 8,000 32-px images in
    # ~21 s on a CPU, so a 1000-image shard is ~3 s there, and a minute even in a 20x slower setup.
    shard_size: int = 1000  # images per shard file: the unit of resumption (a kill loses one)
    num_workers: int = 2  # DataLoader workers decoding images
    device: str = "auto"  # "auto", "cpu" or "cuda"
    skip_bad_images: bool = False  # leave out unreadable images (listed in meta.json), don't stop
    text: TextCacheConfig = field(default_factory=TextCacheConfig)  # text-to-image: the captions' tokens or encoder features

    def validate(self) -> None:
        check_fields(self, "", {"batch_size": ">= 1", "shard_size": ">= 1", "num_workers": ">= 0",
                                "device": ("auto", "cpu", "cuda")})
        if not Path(self.tokenizer).exists():
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


def item_layout(model, grid) -> tuple[tuple, type]:
    """(shape, dtype) of one variant of one image in the cache: (h*w,) uint16 codes, (L,) uint16
    codes of all scales, or the posterior's (2C, h, w) moments in float16 (half the bytes; the
    mean keeps ~3 digits)."""
    if model.kind == "discrete":
        return (grid[0] * grid[1],), np.uint16
    if model.kind == "multiscale":
        return (model.seq_len,), np.uint16
    return (2 * model.latent_channels, *grid), np.float16


def encode_both(model, x: torch.Tensor, dtype) -> np.ndarray:
    """(B, 2, ...) cache entries of the images and their mirror images."""
    both = torch.cat([x, x.flip(-1)])
    out = model.moments(both) if model.kind == "continuous" else model.encode(both).flatten(1)
    out = out.view(2, len(x), *out.shape[1:]).transpose(0, 1)  # (B, 2, ...): originals, flips
    return out.cpu().numpy().astype(dtype)


@torch.no_grad()
def encode_span(model, dataset, span: Span, cfg: EncodeConfig, device, bar,
                layout: tuple[tuple, type]) -> tuple[np.ndarray, list[int]]:
    """Cache entries of the readable items of the span and of their mirror images (n, 2, ...),
    and the indices of the items left out (only with skip_bad_images)."""
    loader = DataLoader(Subset(_Guarded(dataset), range(span.lo, span.hi)),
                        batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda")
    shape, dtype = layout
    parts, skipped = [np.empty((0, len(VARIANTS), *shape), dtype)], []
    for x, index, errors in loader:
        bad = [j for j, e in enumerate(errors) if e]
        if bad and not cfg.skip_bad_images:
            raise bad_image_error(errors[bad[0]])
        skipped += [int(index[j]) for j in bad]
        keep = torch.tensor([not e for e in errors])
        x = x[keep].to(device, non_blocking=True)
        if len(x):
            entries = encode_both(model, x, dtype)
            finite = np.isfinite(entries.reshape(len(x), -1)).all(1)  # float16 tops out at 65504
            if not finite.all():
                first = int(index[keep].numpy()[~finite][0])
                raise ValueError(f"{dataset.samples[first][0]}: the tokenizer's posterior moments "
                                 f"are not finite in float16 (|value| > 65504, or NaN); check "
                                 f"the tokenizer weights")
            parts.append(entries)
        bar.update(len(errors))
    return np.concatenate(parts), skipped


def encode_shards(model, dataset: ClassFolderDataset, names: list[str], spans: list[Span],
                  settings: dict, cfg: EncodeConfig, device, layout, show: bool, log) -> None:
    """Encode and write the shard of each span (the spans this process was given)."""
    # `with`: an error closes the bar first, so the error line starts a line of its own
    with tqdm(total=sum(s.hi - s.lo for s in spans), disable=not show, desc="encode",
              unit="img", dynamic_ncols=True) as bar:
        for span in spans:
            codes, skipped = encode_span(model, dataset, span, cfg, device, bar, layout)
            left_out = set(skipped)
            labels = np.array([dataset.samples[i][1] for i in range(span.lo, span.hi)
                               if i not in left_out], dtype=np.int64)
            for i in skipped:
                log.warning(f"skipped unreadable image {names[i]} (skip_bad_images=true)")
            records = [{"file": names[i], **file_stamp(Path(dataset.samples[i][0]))}
                       for i in skipped]
            write_shard(Path(cfg.out), span, settings, codes, labels, records, model.kind)


# ------------------------------------------------------------------------------ the command

def load_cache_tokenizer(weights: Path, device):
    model = load_tokenizer(weights, device=device)
    if model.kind == "continuous":
        if model.cfg.latent_scale <= 0:  # meta.json must tell the data stream the scale
            raise ValueError(f"tokenizer={weights} has latent_scale {model.cfg.latent_scale}; "
                             f"export it with `python -m tokenizer.train` (which measures it) or "
                             f"give it a positive model.latent_scale")
        return model
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
    model = load_cache_tokenizer(weights, info.device)
    text_encoder = check_text_inputs(cfg, dataset, info)  # before any image is encoded
    grid = model.grid(cfg.data.resolution)
    layout = item_layout(model, grid)
    # the settings that change every code; which files a shard holds is checked shard by shard
    settings = {"tokenizer_sha256": tokenizer_sha256(weights), "data_root": str(root.resolve()),
                "resolution": cfg.data.resolution, "shard_size": cfg.shard_size}
    spans = plan_shards(dataset, cfg.shard_size)
    changed = prepare_folder(out, spans, settings, info.is_main)
    barrier()

    done = functools.partial(shard_done, out, settings=settings, item_shape=layout[0], root=root,
                             skip_ok=cfg.skip_bad_images, kind=model.kind)
    todo = [s for s in spans if not done(s)]
    mine = [s for s in todo if s.k % info.world_size == info.rank]
    what = f"{model.latent_channels}-channel latents (moments in float16)" \
        if model.kind == "continuous" else f"codebook {model.codebook_size}"
    if model.kind == "multiscale":
        what += f", scales {model.patch_nums}"
    log.info(f"{dataset}: {len(spans)} shards, {len(spans) - len(todo)} already done; "
             f"grid {grid[0]}x{grid[1]}, {what}")
    encode_shards(model, dataset, names, mine, settings, cfg, info.device, layout,
                  show=info.is_main and bool(todo), log=log)
    barrier()
    meta = {}
    if info.is_main:
        tok = tokenizer_identity(weights, settings["tokenizer_sha256"])
        meta = finish(out, dataset, names, spans, cfg, tok, grid, model, done,
                      nothing_done=not todo and not changed, log=log)
        if cfg.text.kind != "none":
            meta = {**meta, "text": write_text_cache(out, cfg.text, info.device, log, text_encoder)}
    barrier()
    cleanup()
    return meta


def check_text_inputs(cfg: EncodeConfig, dataset: ClassFolderDataset, info):
    """With text.kind set: the dataset's captions and (text.kind=encoder) the encoder folder,
    loaded now (on the main process, which writes the caption cache) so that a bad folder is
    named before the images are encoded. Returns the loaded encoder, or None."""
    if cfg.text.kind == "none":
        return None
    if dataset.captions is None:
        raise ValueError(f"text.kind={cfg.text.kind}: data.root={cfg.data.root} has no "
                         f"captions.jsonl, and a text model needs one caption per image. Put a "
                         f"captions.jsonl ({{\"file\", \"caption\"}} per image) in the dataset "
                         f"root (`python -m dataset.shapes` writes one), or leave text.kind unset")
    if cfg.text.kind != "encoder" or not info.is_main:
        return None
    from tokenizer.text_encoder import load_text_encoder

    return load_text_encoder(cfg.text.encoder, device=info.device)


def tokenizer_identity(weights: Path, sha: str) -> dict:
    tcfg = read_tokenizer_config(weights)
    return {"name": tcfg.name, "path": str(weights), "sha256": sha,
            "config": dataclasses.asdict(tcfg)}


def cache_facts(model) -> dict:
    """The kind of cache the tokenizer makes and what meta.json records about its codes."""
    if model.kind == "continuous":
        return {"kind": "continuous", "channels": model.latent_channels,
                "latent_scale": model.cfg.latent_scale, "latent_shift": model.cfg.latent_shift}
    facts = {"kind": model.kind, "codebook_size": model.codebook_size}
    return {**facts, "scales": list(model.patch_nums)} if model.kind == "multiscale" else facts


def finish(out: Path, dataset, names, spans, cfg, tok, grid, model, done,
           nothing_done: bool, log) -> dict:
    """Check every shard, then write meta.json; says so when the cache was already complete."""
    missing = [s.k for s in spans if not done(s)]
    if missing:
        raise RuntimeError(f"shards {missing} of {out} are missing after encoding (did a rank "
                           f"fail?); re-run the same command to finish them")
    meta, captions = build_meta(out, dataset, names, spans, cfg.data.root, cfg.data.resolution,
                                tok, grid, cache_facts(model))
    changed = write_meta(out, meta, captions)
    skipped = f" ({len(meta['skipped'])} unreadable images skipped)" if meta["skipped"] else ""
    if nothing_done and not changed:
        kind = "latent" if model.kind == "continuous" else "code"
        log.info(f"{kind} cache {out} already complete: {meta['count']} images in {len(spans)} "
                 f"shards{skipped}; nothing to do")
    else:
        what = {"discrete": "code grids", "multiscale": "code pyramids",
                "continuous": "posteriors"}[model.kind]
        log.info(f"wrote {meta['count']} x {len(VARIANTS)} {what} in {len(spans)} shards "
                 f"to {out}{skipped}")
    return meta


def main(argv: list[str] | None = None) -> dict:
    """The command: any error ends in one `error: ...` line (SystemExit), as on the command line."""
    return run_cli(run, EncodeConfig, __doc__, argv)


if __name__ == "__main__":
    main()
