"""File helpers: atomic writes, hashes, and safetensors weights that carry their config.

Exported weights are the only thing `sample.py` and `eval_fid.py` read. A weights file holds
the tensors plus, in its header metadata, the resolved YAML config that rebuilds the module
and a `kind` tag ("generator", "vq", ...); a `.yaml` sidecar with the same config sits beside it
for people to read. Nothing is pickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it over `path` atomically.

    A crash leaves either the old file or the new one, never a half-written file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file private (0600); give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


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
        save_file(flat, str(tmp), metadata=meta)
    atomic_write_text(path.with_suffix(".yaml"), config_yaml)
    return path


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
