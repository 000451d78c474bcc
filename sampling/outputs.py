"""From codes to files: decoding, labelled grids, resumable PNG shards and the ADM `.npz`.

Sample shards: image i belongs to shard i // shard_size. A shard is written into a temporary
folder and renamed into place when complete, so a finished shard is never redone and a half
written one never counts. The `.npz` for FID is packed from the shards in index order:
`arr_0` uint8 (N, H, W, 3) and `arr_1` int64 labels (N,), the ADM evaluator's layout; samples
of a text-to-image model add `prompts`, each image's prompt as a unicode array (loadable with
allow_pickle=False), `arr_1` then being the prompt's index.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from common.io import atomic_dir, atomic_path
from dataset.images import to_uint8


@torch.no_grad()
def decode_codes(tokenizer, codes: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Code grids (B, h, w) -> uint8 images (B, H, W, 3)."""
    device = next(tokenizer.parameters()).device
    out = []
    for chunk in codes.split(batch_size):
        out.append(to_uint8(tokenizer.decode(chunk.to(device)).float().cpu()))
    return np.concatenate(out)


def grid_image(images: np.ndarray, ncol: int, row_labels: list[str] | None = None,
               min_cell: int = 96, pad: int = 2) -> Image.Image:
    """Tile images (N, H, W, 3) into rows of `ncol`, labelling each row on the left.

    Small images are enlarged by an integer factor (nearest neighbour, so no pixel is
    invented) until a cell is at least `min_cell` pixels wide.
    """
    n, h, w, _ = images.shape
    scale = max(1, -(-min_cell // w))
    cell_h, cell_w = h * scale, w * scale
    nrow = -(-n // ncol)
    font = ImageFont.load_default()
    label_w = 0
    if row_labels:
        label_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(t, font=font))
                      for t in row_labels) + 2 * pad + 4
    canvas = Image.new("RGB", (label_w + ncol * (cell_w + pad) + pad, nrow * (cell_h + pad) + pad),
                       (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, ncol)
        tile = Image.fromarray(images[i]).resize((cell_w, cell_h), Image.NEAREST)
        canvas.paste(tile, (label_w + pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    for r, text in enumerate(row_labels or []):
        draw.text((pad + 2, pad + r * (cell_h + pad) + cell_h // 2 - 5), text, fill=(0, 0, 0), font=font)
    return canvas


def save_grid(images: np.ndarray, ncol: int, path: str | Path, row_labels: list[str] | None = None) -> bool:
    """Write the grid PNG; an existing file with the same bytes is left untouched (a re-run
    changes nothing). Returns whether the file was written."""
    path = Path(path)
    buffer = io.BytesIO()
    grid_image(images, ncol, row_labels).save(buffer, format="PNG")
    if path.is_file() and path.read_bytes() == buffer.getvalue():
        return False
    with atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return True


# ---------------------------------------------------------------------- PNG shards

def shard_dir(root: str | Path, shard: int) -> Path:
    return Path(root) / f"shard_{shard:05d}"


def shard_done(root: str | Path, shard: int) -> bool:
    return (shard_dir(root, shard) / "labels.json").is_file()


def write_shard(root: str | Path, shard: int, ids: np.ndarray, images: np.ndarray,
                labels: np.ndarray, cost: dict | None = None) -> Path:
    """Write one finished shard (images named by global index) atomically; `cost`: what
    sampling it took (forward passes, seconds), kept beside the images as cost.json."""
    final = shard_dir(root, shard)
    with atomic_dir(final) as tmp:
        for i, img in zip(ids, images):
            Image.fromarray(img).save(tmp / f"{int(i):06d}.png")
        if cost is not None:
            (tmp / "cost.json").write_text(json.dumps(cost))
        (tmp / "labels.json").write_text(json.dumps({f"{int(i):06d}": int(l) for i, l in zip(ids, labels)}))
    return final


def read_shard_cost(root: str | Path, shard: int) -> dict | None:
    path = shard_dir(root, shard) / "cost.json"
    return json.loads(path.read_text()) if path.is_file() else None


def npz_done(path: str | Path, count: int) -> bool:
    """Whether `path` is a packed .npz of `count` images (read from its headers only). It is
    written atomically, so a file that exists is complete."""
    try:
        with zipfile.ZipFile(path) as zf:
            with zf.open("arr_0.npy") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                    np.lib.format.read_array_header_2_0
                shape = read(f)[0]
            return shape[0] == count and "arr_1.npy" in zf.namelist()
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return False


def pack_npz(root: str | Path, num_shards: int, path: str | Path, expected: int | None = None,
             transform: Callable[[np.ndarray], np.ndarray] | None = None,
             progress: bool = False, prompts: list[str] | None = None) -> tuple[int, tuple]:
    """Pack all shards, in index order, into an ADM-layout .npz (arr_0 uint8 NHWC, arr_1
    labels); returns (count, image shape). Streams shard by shard, so 50,000 images are never
    all in memory. `transform` maps each uint8 (B, H, W, 3) shard to the stored images (e.g. a
    resize); `expected` is the image count the shards must hold; `prompts` (the labels being
    indices into it) adds each image's prompt as "prompts"."""
    tables = [json.loads((shard_dir(root, k) / "labels.json").read_text()) for k in range(num_shards)]
    names = [sorted(t) for t in tables]  # zero-padded global indices: sorted = index order
    count = sum(len(t) for t in tables)
    if expected is not None and count != expected:
        raise RuntimeError(f"{root}: the shards hold {count} images, not {expected}")

    def shard_images(k: int) -> np.ndarray:
        batch = np.stack([np.asarray(Image.open(shard_dir(root, k) / f"{n}.png").convert("RGB"))
                          for n in names[k]])
        return np.ascontiguousarray(transform(batch) if transform else batch)

    first = shard_images(0)
    labels = np.asarray([t[n] for t, ns in zip(tables, names) for n in ns], dtype=np.int64)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("arr_0.npy", "w", force_zip64=True) as f:
            header = {"descr": "|u1", "fortran_order": False, "shape": (count, *first.shape[1:])}
            np.lib.format.write_array_header_1_0(f, header)
            for k in tqdm(range(num_shards), desc="pack", disable=not progress):
                f.write((first if k == 0 else shard_images(k)).tobytes())
        with zf.open("arr_1.npy", "w") as f:
            np.lib.format.write_array(f, labels)
        if prompts is not None:
            with zf.open("prompts.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(prompts, dtype=str)[labels])
    return count, first.shape[1:]
