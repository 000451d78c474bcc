"""From codes to files: decoding, labelled grids, resumable PNG shards and the ADM `.npz`.

Sample shards: image i belongs to shard i // shard_size. A shard is written into a temporary
folder and renamed into place when complete, so a finished shard is never redone and a half
written one never counts. The `.npz` for FID is packed from the shards in index order:
`arr_0` uint8 (N, H, W, 3) and `arr_1` int64 labels (N,), the ADM evaluator's layout.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ar.io import atomic_path
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


def save_grid(images: np.ndarray, ncol: int, path: str | Path, row_labels: list[str] | None = None) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        grid_image(images, ncol, row_labels).save(tmp, format="PNG")
    return path


# ---------------------------------------------------------------------- PNG shards

def shard_dir(root: str | Path, shard: int) -> Path:
    return Path(root) / f"shard_{shard:05d}"


def shard_done(root: str | Path, shard: int) -> bool:
    return (shard_dir(root, shard) / "labels.json").is_file()


def write_shard(root: str | Path, shard: int, ids: np.ndarray, images: np.ndarray,
                labels: np.ndarray) -> Path:
    """Write one finished shard (images named by global index) atomically."""
    final = shard_dir(root, shard)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for i, img in zip(ids, images):
        Image.fromarray(img).save(tmp / f"{int(i):06d}.png")
    (tmp / "labels.json").write_text(json.dumps({f"{int(i):06d}": int(l) for i, l in zip(ids, labels)}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def pack_npz(root: str | Path, num_shards: int, path: str | Path) -> tuple[int, tuple]:
    """Pack all shards, in index order, into an ADM-layout .npz; returns (count, image shape)."""
    images, labels = [], []
    for s in range(num_shards):
        d = shard_dir(root, s)
        table = json.loads((d / "labels.json").read_text())
        for name in sorted(table):
            images.append(np.asarray(Image.open(d / f"{name}.png").convert("RGB")))
            labels.append(table[name])
    arr = np.stack(images)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:  # a file object stops numpy appending ".npz" to the temp name
            np.savez(f, arr_0=arr, arr_1=np.asarray(labels, dtype=np.int64))
    return len(images), arr.shape[1:]
