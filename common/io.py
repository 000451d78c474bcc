"""File helpers: atomic writes, hashes, and safetensors weights that carry their config.

Exported weights are the only thing `sample.py` and `eval_fid.py` read. A weights file holds
the tensors plus, in its header metadata, the resolved YAML config that rebuilds the module
and a `kind` tag ("generator", "vq", ...); a `.yaml` sidecar with the same config sits beside it
for people to read. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

# below this many free bytes, a failed torch.save is taken to be a full disk: torch.save reports
# one as a RuntimeError ("enforce fail at inline_container.cc ... unexpected pos"), not as ENOSPC
_NEARLY_FULL = 64 << 20


class DiskFullError(OSError):
    """A write failed because the file system is full; the message names the file."""

    def __init__(self, path: str | Path, advice: str = "free space and run the same command again"):
        super().__init__(errno.ENOSPC, f"no space left while writing {path}; {advice}")
        self.path = Path(path)

    def __str__(self) -> str:
        return self.strerror


class WriteRefusedError(OSError):
    """The file system refused a write for another reason than space (a read-only mount, no
    permission, a path that cannot hold files such as /proc); the message names the file the
    user asked for, not the temporary one the write went to."""

    def __init__(self, path: str | Path, cause: OSError):
        reason = cause.strerror or str(cause)
        super().__init__(cause.errno, f"cannot write {path} ({reason}); choose a writable "
                                      f"location, or check the folder's permissions and mount")
        self.path = Path(path)

    def __str__(self) -> str:
        return self.strerror


def is_disk_full(exc: BaseException, path: str | Path) -> bool:
    """Only ENOSPC / EDQUOT, or torch.save's RuntimeError on a nearly full file system: any other
    failure (read-only, permission, /proc) is not a full disk, however little space is free."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(exc, RuntimeError):
        folder = Path(path)
        while not folder.is_dir() and folder != folder.parent:
            folder = folder.parent
        try:
            return shutil.disk_usage(folder).free < _NEARLY_FULL
        except OSError:
            return False
    return False


@contextlib.contextmanager
def translate_disk_full(path: str | Path) -> Iterator[None]:
    """Re-raise a failed write naming `path`: DiskFullError on a full disk, WriteRefusedError
    when the file system refused it for another reason."""
    try:
        yield
    except (DiskFullError, WriteRefusedError):
        raise
    except (OSError, RuntimeError) as e:
        if is_disk_full(e, path):
            raise DiskFullError(path) from e
        if isinstance(e, OSError) and e.errno in _REFUSED and _writing(e, Path(path)):
            raise WriteRefusedError(path, e) from e
        raise


# errno values of a write the file system refused for another reason than space
_REFUSED = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR)


def _writing(exc: OSError, target: Path) -> bool:
    """Whether the failed call was on the target, a folder above it or one of our temporary
    files (hidden, '.tmp'), rather than on an input the writer was reading (which its own
    error already names)."""
    if exc.filename is None:
        return True
    failed = Path(exc.filename)
    ours = any(part.startswith(".") and part.endswith(".tmp") for part in failed.parts)
    return ours or failed == target or failed in target.parents


def make_folder(path: str | Path) -> Path:
    """mkdir -p, with a refused or full file system named by `path` (the output folder a
    command was given), as every write here is."""
    path = Path(path)
    with translate_disk_full(path):
        path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path` atomically.

    A crash leaves either the old file or the new one, never a half-written file; a failure
    (a full disk among them, raised as DiskFullError) removes the temporary file.
    """
    path = Path(path)
    make_folder(path.parent)
    with translate_disk_full(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with translate_disk_full(path):
            yield tmp_path
        # mkstemp makes the file private (0600); give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """`atomic_path` for a folder: filled under a temporary name, renamed into place when
    complete; on failure the temporary folder is removed."""
    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with translate_disk_full(final):
            tmp.mkdir(parents=True)
            yield tmp
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> bool:
    """Write `text` atomically; a file that already holds exactly `text` is left untouched
    (same bytes, same mtime), so re-running a finished stage changes nothing. Returns whether
    the file was written."""
    path = Path(path)
    try:
        if path.is_file() and path.read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return True


def atomic_save_npy(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.save would add .npy
        np.save(f, array)


def atomic_torch_save(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_weights(path: str | Path, tensors: Mapping[str, torch.Tensor], kind: str,
                 config_yaml: str, extra: Mapping[str, str] | None = None) -> Path:
    """Write `tensors` as safetensors with the config in the header, plus a `.yaml` sidecar."""
    path = Path(path)
    meta = {"argen_kind": kind, "config": config_yaml, **(extra or {})}
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        write_safetensors(tmp, flat, meta)
    atomic_write_text(path.with_suffix(".yaml"), config_yaml)
    return path


_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                       torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32",
                       torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str]) -> None:
    """The safetensors layout, byte-deterministic: same tensors and metadata, same bytes.

    safetensors' own writer keeps the metadata in a hash map, so two exports of the same weights
    differed in their header and sha256 (and sample.py took them for other weights). Here every
    header key is sorted; tensors are laid out as safetensors does (wider dtypes first, then by
    name), so each starts aligned. Files read back with safetensors' own loaders.
    """
    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise TypeError(f"safetensors metadata values must be strings: {bad}")
    names = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    offset = 0
    for name in names:
        t = tensors[name]
        if t.dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name here")
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:
            t = tensors[name].detach().cpu().contiguous().reshape(-1)
            if t.numel():
                f.write(t.view(torch.uint8).numpy().tobytes())


def read_weights(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], str, dict[str, str]]:
    """Load a weights file written by `save_weights`; returns (tensors, config_yaml, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e}); argen weights are "
                         f".safetensors files exported by training") from None
    found = meta.get("argen_kind")
    if found != kind or "config" not in meta:
        raise ValueError(f"{path}: expected argen '{kind}' weights but the file holds "
                         f"{found or 'no argen metadata'}; foreign checkpoints must be converted first")
    return tensors, meta["config"], meta


def load_state_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str,
                      assign: bool = False) -> None:
    """`load_state_dict(strict=True)` with an error that lists every mismatch by name and shape."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (is it from a different model size?): "
                         + "; ".join(shapes[:8]) + (" ..." if len(shapes) > 8 else ""))
        if missing:
            parts.append(f"{len(missing)} missing keys: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise ValueError(f"{source} does not fit the model: " + " | ".join(parts))
    module.load_state_dict(state, strict=True, assign=assign)
