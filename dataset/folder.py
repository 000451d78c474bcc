"""Class-folder image datasets (the ImageNet layout): `root/<class_name>/**/<image>`.

Labels are indices into the sorted class-folder names, so the standard ImageNet synset folders
give the standard 1000 labels. An optional `root/captions.jsonl` (one {"file", "caption"} object
per line, `file` relative to root) gives every image a caption for text-to-image training; the
built-in `shapes` set writes one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from common.io import sha256_file
from dataset.images import IMAGE_EXTENSIONS, is_image_file, load_image, to_tensor

CAPTIONS_FILE = "captions.jsonl"
# what a run records of its images, so that a resume on other images is refused: "stat" hashes
# names, sizes and modification times (cheap at 1.28M files), "content" every file's bytes
FINGERPRINTS = ("stat", "content")
_HOW_TO_GET_DATA = ("create it with `python -m dataset.shapes` or point data.root at an "
                    "ImageNet-layout folder (root/<class_name>/<images>)")


def _visible(name: str) -> bool:
    # Hidden entries are editor/OS debris (.ipynb_checkpoints, macOS ._x.jpg) or our own
    # in-progress temp files; none of them is a class or an image.
    return not name.startswith(".")


def find_classes(root: Path) -> list[str]:
    """Sorted names of the visible sub-directories of `root`, with clear errors when unusable."""
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {root} not found; {_HOW_TO_GET_DATA}")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset root {root} is a file, not a folder; {_HOW_TO_GET_DATA}")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))
    if not classes:
        raise ValueError(f"dataset folder {root} has no class sub-folders; expected "
                         f"root/<class_name>/<images>: {_HOW_TO_GET_DATA}")
    return classes


def find_images(class_dir: Path) -> list[str]:
    """Image files anywhere under `class_dir`, sorted by relative path for a deterministic order."""
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        found.extend(os.path.join(dirpath, f) for f in filenames
                     if _visible(f) and is_image_file(f))
    prefix = len(os.path.join(str(class_dir), ""))
    found.sort(key=lambda p: p[prefix:].replace(os.sep, "/"))
    if not found:
        raise ValueError(f"class folder {class_dir} holds no images (looked for "
                         f"{', '.join(IMAGE_EXTENSIONS)}, in sub-folders too); add images or "
                         f"remove the folder")
    return found


def read_captions(root: Path, samples: list[tuple[str, int]]) -> list[str] | None:
    """Captions for `samples` from `root/captions.jsonl`, or None when there is no such file.

    Every sample needs exactly one caption and every caption line must name a sample, since a
    silent mismatch would train text-to-image on the wrong pairs.
    """
    path = root / CAPTIONS_FILE
    if not path.is_file():
        return None
    index = {os.path.normpath(os.path.relpath(p, root)): i for i, (p, _) in enumerate(samples)}
    captions: list[str | None] = [None] * len(samples)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e}); each line must be one object "
                                 f'like {{"file": "cls/img.png", "caption": "..."}}') from None
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) \
                    or not isinstance(entry.get("caption"), str):
                raise ValueError(f'{where}: needs string keys "file" (path relative to {root}) '
                                 f'and "caption"')
            i = index.get(os.path.normpath(entry["file"]))
            if i is None:
                raise ValueError(f"{where}: file {entry['file']!r} is not an image of this "
                                 f"dataset (missing, or not inside a class folder); fix or "
                                 f"delete the line")
            if captions[i] is not None:
                raise ValueError(f"{where}: second caption for {entry['file']!r}; keep one")
            captions[i] = entry["caption"]
    missing = [samples[i][0] for i, c in enumerate(captions) if c is None]
    if missing:
        raise ValueError(f"{path}: {len(missing)} images have no caption, e.g. {missing[0]}; "
                         f"add a line for each image or delete the captions file")
    return captions  # type: ignore[return-value]


class ClassFolderDataset(Dataset):
    """Images under `root/<class_name>/`, ADM-center-cropped to `resolution`, in [-1, 1]."""

    def __init__(self, root: str | Path, resolution: int):
        self.root = Path(root)
        self.resolution = int(resolution)
        self.classes: list[str] = find_classes(self.root)
        self.samples: list[tuple[str, int]] = [
            (path, label)
            for label, name in enumerate(self.classes)
            for path in find_images(self.root / name)
        ]
        self.captions: list[str] | None = read_captions(self.root, self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def relative_name(self, i: int) -> str:
        """Image i's path relative to the root, '/'-separated (what caches record)."""
        return os.path.relpath(self.samples[i][0], self.root).replace(os.sep, "/")

    def files_sha256(self, lo: int = 0, hi: int | None = None) -> str:
        """Hash of the (label, relative path) list of items [lo, hi). Labels are in it because
        adding a class folder renumbers the labels of unchanged files."""
        return _sha256_lines(f"{self.samples[i][1]}\t{self.relative_name(i)}"
                             for i in range(lo, len(self) if hi is None else hi))

    def stamps_sha256(self, lo: int = 0, hi: int | None = None) -> str:
        """Hash of the sizes and modification times of items [lo, hi): changes when an image
        is rewritten in place under the same name."""
        stamps = (file_stamp(Path(self.samples[i][0]))
                  for i in range(lo, len(self) if hi is None else hi))
        return _sha256_lines(f"{s['size']}\t{s['mtime_ns']}" for s in stamps)

    def content_sha256(self) -> str:
        """Hash of every image's bytes, in dataset order (reads the whole dataset)."""
        return _sha256_lines(sha256_file(path) for path, _ in self.samples)

    def fingerprint(self, mode: str = "stat") -> dict:
        """What identifies these images (FINGERPRINTS): the count and file list always, plus
        the files' stamps ("stat") or their bytes ("content")."""
        if mode not in FINGERPRINTS:
            raise ValueError(f"fingerprint mode {mode!r} is not one of {FINGERPRINTS}")
        found = {"images": len(self), "files_sha256": self.files_sha256()}
        if mode == "content":
            return {**found, "content_sha256": self.content_sha256()}
        return {**found, "stamps_sha256": self.stamps_sha256()}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return to_tensor(load_image(path, self.resolution)), label  # (3, R, R)

    def __repr__(self) -> str:
        caps = ", with captions" if self.captions is not None else ""
        return (f"ClassFolderDataset({str(self.root)!r}, resolution={self.resolution}: "
                f"{len(self)} images, {len(self.classes)} classes{caps})")


def file_stamp(path: Path) -> dict:
    """{size, mtime_ns} of a file, both None when it cannot be read."""
    try:
        st = path.stat()
    except OSError:
        return {"size": None, "mtime_ns": None}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _sha256_lines(lines) -> str:
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode() + b"\n")
    return h.hexdigest()
