"""What every converter of released checkpoints shares: reading a foreign file safely, finding
its state dict, renaming keys by an explicit table, and naming every key that does not fit.

    obj, path = load_foreign("c2i_XL_384.pt")                      # torch.load(weights_only=True)
    state, layout, entry = select_state(obj, path, layout="auto")  # ddp | fsdp | deepspeed
    mapped, dropped = split_keys(state, KEY_TABLE, DERIVED, str(path), project="LlamaGen")
    check_keys(model.state_dict(), mapped, str(path))

Key tables map a foreign name to argen's; `{i}` stands for a layer index. Nothing here knows a
particular project: the tables and the architecture facts live in each converter's module.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
import zipfile
from pathlib import Path

import torch

from common.config import ConfigError, run_cli

LAYOUTS = ("auto", "ddp", "fsdp", "deepspeed")  # how a training script saved its state dict


def _pattern(template: str) -> re.Pattern:
    return re.compile(template.replace(".", r"\.").replace("{i}", r"(?P<i>\d+)") + "$")


def rename(key: str, table: dict[str, str]) -> str | None:
    """The table's name for `key`, or None when no entry matches."""
    if key in table:  # an exact entry (tables written out key by key need no patterns)
        return table[key]
    for src, dst in table.items():
        m = _pattern(src).match(key)
        if m:
            return dst.replace("{i}", m.group("i")) if "{i}" in src else dst
    return None


def load_foreign(path: str | Path):
    """(object, file) from torch.load(weights_only=True); a folder means its consolidated.pth."""
    path = Path(path)
    if path.is_dir():
        if not (path / "consolidated.pth").is_file():
            raise FileNotFoundError(f"{path} is a folder without consolidated.pth; pass the "
                                    f"checkpoint file itself")
        path = path / "consolidated.pth"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; download it first (see the "
                                f"README section 'Reproducing published numbers')")
    try:
        return _torch_load(path), path
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        what = f"a pickled {found.group(1)} object" if found else "pickled objects other than tensors"
        raise ValueError(f"{path}: refused to load: it holds {what}, and foreign checkpoints are "
                         f"read with torch.load(weights_only=True), which never runs code from the "
                         f"file. If you trust the file, re-save just its state dict as "
                         f"{{'model': state_dict}} in a separate step and convert that") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable PyTorch checkpoint "
                         f"({str(e).splitlines()[0][:200]})") from None


def _torch_load(path: Path):
    """torch.load(weights_only=True), memory-mapped where the file allows: a 3B checkpoint
    (12 GB) is then paged in as read, not copied; a zip of compressed records cannot be
    mapped and is read whole."""
    # Namespace: LlamaGen's and xAR's pickled training args, a bag of plain values
    with torch.serialization.safe_globals([argparse.Namespace]):
        if zipfile.is_zipfile(path):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "not resizable" not in str(e):  # mmap refused: compressed records
                    raise
        return torch.load(path, map_location="cpu", weights_only=True)


def select_state(obj, path: Path, layout: str = "auto", use_ema: bool = False):
    """The state dict inside a loaded checkpoint: (state, layout, entry name or None)."""
    if layout not in LAYOUTS:
        raise ConfigError(f"layout={layout!r}; choose one of {LAYOUTS}")
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    if layout == "auto":
        if "model" in obj:
            layout = "ddp"
        elif "module" in obj:
            layout = "deepspeed"
        elif obj and all(torch.is_tensor(v) for v in obj.values()):
            layout = "fsdp"
        else:
            raise ValueError(f"{path}: cannot tell the checkpoint layout from its top-level keys "
                             f"{sorted(obj)[:10]}; expected 'model' (DDP), 'module' (DeepSpeed) or "
                             f"a raw state dict of tensors (FSDP consolidated.pth)")
    if use_ema and layout != "ddp":
        raise ValueError(f"{path}: use_ema=true needs a DDP checkpoint with an 'ema' entry "
                         f"(layout is {layout})")
    entry = {"ddp": "ema" if use_ema else "model", "deepspeed": "module", "fsdp": None}[layout]
    state = obj if entry is None else obj.get(entry)
    if state is None:
        raise ValueError(f"{path}: no '{entry}' entry for layout={layout}; its top-level keys are "
                         f"{sorted(obj)[:10]}")
    bad = sorted(k for k, v in state.items() if not torch.is_tensor(v))
    if bad:
        raise ValueError(f"{path}: {len(bad)} entries of the {entry or 'raw'} state dict are not "
                         f"tensors: {bad[:8]}; is layout={layout} right?")
    return dict(state), layout, entry


def split_keys(state: dict, table: dict[str, str] | None, derived, source: str,
               project: str = "LlamaGen"):
    """Rename by `table` (None: names kept) and drop `derived`; unknown keys are an error."""
    mapped, dropped, unknown = {}, {}, []
    derived_table = {d: d for d in derived}
    for key, value in state.items():
        if rename(key, derived_table) is not None:
            dropped[key] = value
            continue
        new = key if table is None else rename(key, table)
        if new is None:
            unknown.append(key)
        else:
            mapped[new] = value
    if unknown:
        hint = ""
        if any(k.startswith(("module.", "_orig_mod.")) for k in unknown):
            hint = (" The names carry a DDP/torch.compile wrapper prefix ('module.' or "
                    "'_orig_mod.'): save the unwrapped model's state dict.")
        raise ValueError(f"{source}: {len(unknown)} keys the {project} key table does not know: "
                         f"{sorted(unknown)[:12]}{' ...' if len(unknown) > 12 else ''}.{hint}")
    return mapped, dropped


def check_keys(own: dict, given: dict, source: str, names=lambda k: k) -> None:
    """Missing keys and shape mismatches between a model's state dict and the mapped tensors,
    listed under `names` (the checkpoint's own names)."""
    missing = sorted(names(k) for k in set(own) - set(given))
    shapes = [f"{names(k)}: file {tuple(given[k].shape)} vs expected {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(given)) if tuple(own[k].shape) != tuple(given[k].shape)]
    extra = sorted(names(k) for k in set(given) - set(own))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys: {missing[:12]}{' ...' if len(missing) > 12 else ''}")
    if extra:
        parts.append(f"{len(extra)} keys beyond the inferred architecture: {extra[:12]}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches: " + "; ".join(shapes[:8]))
    if parts:
        raise ValueError(f"{source} does not fit the architecture read from its shapes: "
                         + " | ".join(parts))


def load_converted(build, mapped: dict, source: str, names=lambda k: k):
    """The module `build()` makes, built on the meta device and given the mapped tensors:
    every missing, extra or mis-shaped key is an error listed under `names` (the file's own
    names), then a strict load that takes the tensors as they are."""
    with torch.device("meta"):  # shapes only; the checkpoint's tensors are assigned below
        model = build()
    check_keys(model.state_dict(), mapped, source, names)
    model.load_state_dict(mapped, strict=True, assign=True)
    return model


def up_to_date(out: Path, config_yaml: str, source: dict) -> bool:
    """Whether `out` was converted from the same file with the same resulting config."""
    if not out.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(out), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # unreadable: convert again
        return False
    return meta.get("config") == config_yaml and meta.get("source") == json.dumps(source)


def positional(args: list[str], names: tuple[str, ...], doc: str) -> list[str]:
    """key=value arguments with bare paths given names in order (`IN.ckpt OUT.safetensors` ->
    ckpt=IN.ckpt out=OUT.safetensors); more bare arguments than names exit with the usage."""
    bare = [a for a in args if "=" not in a and not a.startswith("-")]
    if len(bare) > len(names):
        sys.exit(doc.strip() + f"\n\nerror: expected at most {len(names)} paths "
                               f"({' '.join(names)}), got {bare}")
    return [f"{k}={v}" for k, v in zip(names, bare)] + [a for a in args if a not in bare]


def run_converter(convert, schema, doc: str, argv: list[str] | None) -> Path:
    """A converter's `main`: bare paths are ckpt then out, the rest key=value; any error is
    one line naming what to fix (common.config.run_cli)."""
    args = positional(list(sys.argv[1:] if argv is None else argv), ("ckpt", "out"), doc)
    return run_cli(convert, schema, doc, args)


def run_commands(commands: dict, doc: str, argv: list[str] | None) -> Path:
    """The `main` of a converter with several kinds (`convert.llamagen gpt|vq ...`): the first
    word picks (schema, convert) from `commands`, the rest is as for run_converter."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in commands:
        sys.exit(doc.strip() + f"\n\nerror: the first argument must be one of {sorted(commands)}")
    schema, convert = commands[args[0]]
    return run_converter(convert, schema, doc, args[1:])
