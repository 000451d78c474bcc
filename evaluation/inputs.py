"""Image sets to score: an ADM `.npz`, a folder of images, or a uint8 array, read in batches.

    source = open_images("runs/x/samples/samples.npz")    # arr_0 uint8 (N, H, W, 3), arr_1 labels
    source = open_images("samples/")                      # PNGs, recursively, sorted by path
    source = open_images("imagenet/val", resolution=256)  # class folders + ADM center crop
    source = open_images(uint8_array, labels=labels)
    for batch in source.batches(64): ...                  # uint8 (B, H, W, 3)

Labels, when known, come from `arr_1`, from `labels.json` files beside the images (the PNG
shards `sample.py` writes) or from class sub-folders (`root/<class>/...`, labels in sorted
folder-name order as in dataset.folder). `resolution` > 0 applies the ADM center crop to
every image (building ImageNet references); without it images are used exactly as stored.
A `.npz` is streamed from its zip member, so a 50k x 256 x 256 set never sits in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dataset.images import ImageReadError, adm_center_crop, is_image_file

# Lossy formats change FID noticeably (clean-fid "JPEG Image Compression"); webp may be
# lossless but usually is not, so it is flagged too.
LOSSY_SUFFIXES = (".jpg", ".jpeg", ".webp")


def _crop_batch(batch: np.ndarray, resolution: int) -> np.ndarray:
    if not resolution or batch.shape[1:3] == (resolution, resolution):
        return batch
    return np.stack([np.asarray(adm_center_crop(Image.fromarray(im), resolution)) for im in batch])


class ImageSource:
    """What every input kind provides: count, size, labels, provenance and `batches()`."""

    kind = "?"  # "npz", "folder" or "array"
    path: str | None = None
    count: int = 0
    image_size: tuple[int, int] = (0, 0)  # (H, W) after any crop
    labels: np.ndarray | None = None
    label_source: str | None = None  # "arr_1", "labels.json", "class folders", "given"
    class_names: list[str] | None = None
    file_formats: dict[str, int]  # file suffix -> count ("uint8 array" for arrays)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.count

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path, "count": self.count,
                "image_size": list(self.image_size), "file_formats": dict(self.file_formats),
                "labels": self.label_source, "files_stamp": self.files_stamp()}

    def files_stamp(self) -> str | None:
        """sha256 over the files' names, sizes and mtimes: cheap, and changes when they do."""
        files = getattr(self, "files", [Path(self.path)] if self.path else [])
        if not files:
            return None
        h = hashlib.sha256()
        for f in files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return h.hexdigest()


# ----------------------------------------------------------------------------- arrays

class ArrayImages(ImageSource):
    kind = "array"

    def __init__(self, images, labels=None, resolution: int = 0):
        arr = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {arr.dtype} {arr.shape}; "
                             f"convert float images in [-1, 1] with dataset.images.to_uint8")
        self.array, self.resolution, self.count = arr, resolution, len(arr)
        self.image_size = (resolution, resolution) if resolution else tuple(arr.shape[1:3])
        self.file_formats = {"uint8 array": len(arr)}
        if labels is not None:
            self.labels, self.label_source = _check_labels(labels, len(arr), "labels"), "given"

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.count, batch_size):
            yield _crop_batch(self.array[start:start + batch_size], self.resolution)


# ----------------------------------------------------------------------------- .npz

# What a file that is not a zip archive is likely to be, by its first bytes: np.load would try
# to unpickle it and report only "Cannot load file containing pickled data".
_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
               (b"GIF8", "a GIF image"), (b"RIFF", "a RIFF/WebP file"),
               (b"\x93NUMPY", "a single array saved with np.save, not np.savez"),
               (b"PK\x03\x04", "a zip archive cut short, e.g. an interrupted copy"),
               (b"\x80", "a pickle"))


def what_file_is(path: str | Path) -> str:
    """A few words on what `path` holds, for a message saying it is not what was expected."""
    with open(path, "rb") as f:
        head = f.read(256)
    if not head:
        return "the file is empty"
    for signature, what in _SIGNATURES:
        if head.startswith(signature):
            return f"it is {what}"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with the bytes {head[:8]!r}"
    return f"it is text starting {text.strip()[:40]!r}"


def require_npz(path: str | Path, advice: str) -> None:
    """Raise ValueError naming `path` and what it is instead, unless it is a zip archive (the
    container np.savez writes); `advice` says where a right file comes from."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder, not an .npz file; {advice}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz file ({what_file_is(path)}); {advice}")


NPZ_ADVICE = ("pass an ADM .npz (np.savez(path, arr_0=uint8 NHWC images[, arr_1=labels])) or a "
              "folder of PNG images")


def npz_member_header(zf: zipfile.ZipFile, key: str, path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, data offset) of `key`.npy inside an open .npz, read from its header."""
    name = f"{key}.npy"
    if name not in zf.namelist():
        keys = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
        raise KeyError(f"{path}: no '{key}' array (keys: {keys}); {NPZ_ADVICE}")
    with zf.open(name) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        if fortran and len(shape) > 1:
            raise ValueError(f"{path}: '{key}' is stored in Fortran order; re-save it with "
                             f"np.savez(path, arr_0=np.ascontiguousarray(images))")
        return shape, dtype, f.tell()


class NpzImages(ImageSource):
    kind = "npz"

    def __init__(self, path: str | Path, key: str = "arr_0", resolution: int = 0):
        self.path, self.key, self.resolution = str(path), key, resolution
        require_npz(path, NPZ_ADVICE)
        try:
            with zipfile.ZipFile(path) as zf:
                shape, dtype, self._offset = npz_member_header(zf, key, path)
                has_labels = "arr_1.npy" in zf.namelist()
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:  # a damaged member header
            raise ValueError(f"{path}: cannot read '{key}' ({type(e).__name__}: {e}); the file "
                             f"is damaged, write it again") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{path}: '{key}' must be uint8 images (N, H, W, 3) as the ADM "
                             f"evaluator reads them, got {dtype} {shape}")
        self.count, self._shape = shape[0], shape[1:]
        self.image_size = (resolution, resolution) if resolution else tuple(shape[1:3])
        self.file_formats = {".npz uint8": self.count}
        if key == "arr_0" and has_labels:
            with np.load(path, allow_pickle=False) as npz:
                self.labels = _check_labels(npz["arr_1"], self.count, f"{path} arr_1")
            self.label_source = "arr_1"

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        item = int(np.prod(self._shape))
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            f.read(self._offset)  # skip the .npy header
            for start in range(0, self.count, batch_size):
                n = min(batch_size, self.count - start)
                raw = self._read(f, n * item, start)
                batch = np.frombuffer(bytearray(raw), dtype=np.uint8).reshape(n, *self._shape)
                yield _crop_batch(batch, self.resolution)

    def _read(self, f, size: int, start: int) -> bytes:
        """`size` bytes of the member; zipfile reports a damaged one (bad CRC, bad deflate
        stream) without the file's name, so it is added here."""
        try:
            raw = f.read(size)
        except (zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise ValueError(f"{self.path}: '{self.key}' is damaged near image {start} "
                             f"({type(e).__name__}: {e}); write the file again") from None
        if len(raw) != size:
            raise ValueError(f"{self.path}: '{self.key}' is truncated at image {start}; write "
                             f"the file again")
        return raw


# ----------------------------------------------------------------------------- folders

def _list_images(root: Path) -> list[Path]:
    """Image files under `root`, recursively, sorted by relative path; hidden entries and
    `*.tmp` folders (unfinished `sample.py` shards) are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not d.endswith(".tmp")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".") and is_image_file(f)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _labels_json(path: Path) -> dict[str, int]:
    """One shard's {image stem: class} table (sample.py writes it beside the PNGs)."""
    try:
        table = json.loads(path.read_text())
        return {str(k): int(v) for k, v in table.items()}
    except (ValueError, TypeError, AttributeError) as e:  # not JSON, not a mapping, not ints
        raise ValueError(f"{path} is not a {{image name: class index}} table ({e}); delete it "
                         f"to score without labels, or write the shard again") from None


def _folder_labels(root: Path, files: list[Path]) -> tuple[np.ndarray | None, str | None, list | None]:
    """Labels from labels.json beside the images, else from class sub-folders, else none."""
    dirs = sorted({p.parent for p in files})
    if all((d / "labels.json").is_file() for d in dirs):
        tables = {d: _labels_json(d / "labels.json") for d in dirs}
        missing = [p for p in files if p.stem not in tables[p.parent]]
        if missing:
            raise ValueError(f"{missing[0].parent / 'labels.json'} has no label for {missing[0].name}")
        return np.array([tables[p.parent][p.stem] for p in files]), "labels.json", None
    if all(p.parent != root for p in files):
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        index = {c: i for i, c in enumerate(classes)}
        labels = [index[p.relative_to(root).parts[0]] for p in files]
        return np.array(labels), "class folders", classes
    return None, None, None


_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)


def _unreadable(path: Path, e: BaseException, more: int = 0) -> str:
    others = f" (and {more} more unreadable file{'s' * (more != 1)})" if more else ""
    return (f"cannot read image {path}{others}: {type(e).__name__}: {e}; delete or replace the "
            f"file and run again")


def _header_sizes(files: list[Path]) -> list[tuple[int, int]]:
    """(H, W) of every file from its header alone (nothing is decoded), so a file that is not
    an image, or one of another size, fails before the network loads rather than mid-run."""
    sizes, bad = [], []
    for path in files:
        try:
            with Image.open(path) as img:
                sizes.append((img.height, img.width))
        except _PIL_ERRORS as e:
            bad.append((path, e))
    if bad:
        raise ImageReadError(_unreadable(*bad[0], more=len(bad) - 1))
    return sizes


def _different_size(path, size: tuple[int, int], first: tuple[int, int]) -> str:
    return (f"{path} is {size[1]}x{size[0]} but other images are {first[1]}x{first[0]}; all "
            f"samples must have one size (for reference folders pass resolution=R to "
            f"center-crop them)")


def _common_size(files: list[Path], sizes: list[tuple[int, int]]) -> tuple[int, int]:
    for path, size in zip(files, sizes):
        if size != sizes[0]:
            raise ValueError(_different_size(path, size, sizes[0]))
    return sizes[0]


class _Files(Dataset):
    def __init__(self, files: list[Path], resolution: int):
        self.files, self.resolution = files, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        try:
            with Image.open(path) as img:
                img.load()
                rgb = img.convert("RGB")
        except _PIL_ERRORS as e:  # a file cut short after its header: handed to _collate
            return None, _unreadable(path, e)
        if self.resolution:
            rgb = adm_center_crop(rgb, self.resolution)
        return np.asarray(rgb, dtype=np.uint8), str(path)


def _collate(items):
    """A stacked batch, or (error type, message) for `batches` to raise in the main process:
    DataLoader re-raises a worker's error with the worker's traceback pasted into its message."""
    for array, text in items:
        if array is None:
            return ImageReadError, text
    first = items[0][0].shape
    for array, path in items:
        if array.shape != first:
            return ValueError, _different_size(path, array.shape, first)
    return np.stack([a for a, _ in items])


class FolderImages(ImageSource):
    kind = "folder"

    def __init__(self, root: str | Path, resolution: int = 0, num_workers: int = 2):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} not found")
        self.files = _list_images(root)
        if not self.files:
            raise ValueError(f"{root} holds no image files (looked recursively for .png, .jpg, ...)")
        self.path, self.resolution, self.num_workers = str(root), resolution, num_workers
        self.count = len(self.files)
        self.file_formats = dict(Counter(p.suffix.lower() for p in self.files))
        self.labels, self.label_source, self.class_names = _folder_labels(root, self.files)
        sizes = _header_sizes(self.files)
        self.image_size = (resolution, resolution) if resolution else _common_size(self.files, sizes)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        loader = DataLoader(_Files(self.files, self.resolution), batch_size=batch_size,
                            num_workers=self.num_workers, collate_fn=_collate)
        for batch in loader:
            if isinstance(batch, tuple):  # (error type, message) from _collate
                raise batch[0](batch[1])
            yield batch


# ----------------------------------------------------------------------------- dispatch

def _check_labels(labels, count: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != count or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{where}: labels must be {count} integers (one per image), got "
                         f"{labels.dtype} {labels.shape}")
    if count and labels.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, found {labels.min()}")
    return labels.astype(np.int64)


def require_two_images(source: ImageSource) -> None:
    """FID's covariance needs at least 2 images; checked before any network runs."""
    n = len(source)
    if n < 2:
        raise ValueError(f"images={source.path or 'the given array'} holds {n} image"
                         f"{'s' * (n != 1)}; FID needs at least 2 (it estimates a covariance of "
                         f"the features); pass more images")


def open_images(images, labels=None, resolution: int = 0, num_workers: int = 2) -> ImageSource:
    """An ImageSource for a path (.npz file or folder) or a uint8 (N, H, W, 3) array/tensor;
    an ImageSource is used as it is (opened already, e.g. to check it before the network loads)."""
    if isinstance(images, ImageSource):
        if labels is not None:
            images.labels, images.label_source = _check_labels(labels, images.count, "labels"), "given"
        return images
    if isinstance(images, (str, Path)):
        path = Path(images)
        if path.is_dir():
            source: ImageSource = FolderImages(path, resolution, num_workers)
        elif path.suffix == ".npz" and path.is_file():
            source = NpzImages(path, resolution=resolution)
        elif not path.exists():
            raise FileNotFoundError(f"images {path} not found; {NPZ_ADVICE}")
        else:
            raise ValueError(f"images {path}: not an .npz file or a folder; {NPZ_ADVICE}")
        if labels is not None:
            source.labels, source.label_source = _check_labels(labels, source.count, "labels"), "given"
        return source
    return ArrayImages(images, labels, resolution)
