"""Read the tensors of a TorchScript archive without running anything from it.

    tensors = read_script_tensors(open("default_1.pt", "rb").read())  # {"net.layers.conv.weight": ...}

A TorchScript `.pt` is a zip holding `<prefix>/data.pkl` (a pickle of the module tree),
`<prefix>/data/<key>` (raw little-endian tensor storages) and `<prefix>/code/` (TorchScript
source). `torch.jit.load` would compile that code and let the pickle build arbitrary
`__torch__` classes; here the pickle is read by an unpickler with an allow-list instead
(the same idea as `torch.load(weights_only=True)`), so a tampered file can at worst fail to
load. Every `__torch__.*` class becomes an inert record of its attribute dict; the only
callables the pickle may reach are the tensor-rebuild and list-building functions below. The
result is a flat {dotted attribute path: tensor} dict with the names `module.state_dict()`
would give.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
import zipfile

import torch

# Storage classes a TorchScript pickle names, with the dtype of their raw bytes.
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class _Record:
    """Inert stand-in for a `__torch__.*` module class: keeps its pickled attribute dict."""

    type_name = "?"

    def __setstate__(self, state):
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size, stride, *_ignored) -> torch.Tensor:
    """A tensor view (offset, size, stride) of a flat storage, copied out so it owns its memory."""
    return storage.as_strided(tuple(size), tuple(stride), offset).clone()


def _build_list(items):
    return list(items)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _build_list,
    ("torch.jit._pickle", "build_doublelist"): _build_list,
    ("torch.jit._pickle", "build_boollist"): _build_list,
    ("torch.jit._pickle", "build_tensorlist"): _build_list,
}


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, source: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix, self.source = archive, prefix, source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module.startswith("__torch__."):
            return type(name, (_Record,), {"type_name": f"{module}.{name}"})
        raise pickle.UnpicklingError(
            f"{self.source}: refusing to load global {module}.{name}; a TorchScript weights archive "
            f"only needs tensors and module records, so this file is not the expected one")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, number of elements)
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"{self.source}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        raw = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        flat = torch.frombuffer(raw, dtype=storage_type.dtype) if raw else \
            torch.empty(0, dtype=storage_type.dtype)
        if flat.numel() != numel:
            raise pickle.UnpicklingError(f"{self.source}: storage {key} holds {flat.numel()} "
                                         f"elements, the pickle says {numel}")
        return flat


def _collect(obj, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Walk module records depth-first and gather their tensors under dotted names."""
    state = obj.state if isinstance(obj, _Record) else obj
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        path = f"{prefix}{name}"
        if torch.is_tensor(value):
            out[path] = value
        elif isinstance(value, (_Record, dict)):
            _collect(value, path + ".", out)


def read_script_tensors(data: bytes, source: str = "TorchScript archive") -> dict[str, torch.Tensor]:
    """All tensors of a TorchScript archive (given as bytes), keyed like `state_dict()`."""
    if sys.byteorder != "little":
        raise RuntimeError("reading TorchScript storages assumes a little-endian machine")
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ValueError(f"{source}: not a TorchScript archive (not a zip file)") from None
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ValueError(f"{source}: not a TorchScript archive (expected one <name>/data.pkl, "
                         f"found {pickles or 'none'})")
    prefix = pickles[0].split("/")[0]
    order = archive.read(f"{prefix}/byteorder").decode() if f"{prefix}/byteorder" in archive.namelist() \
        else "little"
    if order.strip() != "little":
        raise ValueError(f"{source}: storages are {order}-endian; only little-endian is supported")
    root = _AllowListUnpickler(archive.read(pickles[0]), archive, prefix, source).load()
    tensors: dict[str, torch.Tensor] = {}
    _collect(root, "", tensors)
    if not tensors:
        raise ValueError(f"{source}: the archive holds no tensors")
    return tensors
