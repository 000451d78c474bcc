"""What every converter of released checkpoints shares: reading a foreign file safely, finding
its state dict, renaming keys by an explicit table, and naming every key that does not fit.

    obj, path = load_foreign("c2i_XL_384.pt", "llamagen-gpt")      # torch.load(weights_only=True)
    state, layout, entry = select_state(obj, path, layout="auto")  # ddp | fsdp | deepspeed
    mapped, dropped = split_keys(state, KEY_TABLE, DERIVED, str(path), project="LlamaGen")
    check_keys(model.state_dict(), mapped, str(path))

Key tables map a foreign name to argen's; `{i}` stands for a layer index. The tables and the
architecture facts live in each converter's module; what is here about projects is only how
to tell their checkpoints apart (FAMILIES: a few characteristic keys each), so that a file
given to the wrong converter is named with the command that converts it.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
import zipfile
from dataclasses import dataclass
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


def load_foreign(path: str | Path, family: str | None = None):
    """(object, file) from torch.load(weights_only=True); a folder means its consolidated.pth.
    A file that is not in torch.save's format is refused before torch reads a byte of it, and
    with `family` (a key of FAMILIES) another released family's checkpoint is refused with the
    command that converts it."""
    path = _checkpoint_file(Path(path))
    unlike = _unlike_torch(path)
    if unlike:
        raise ValueError(f"{path} {NOT_TORCH}: {unlike}")
    try:
        obj = _torch_load(path)
    except pickle.UnpicklingError as e:
        refused = _REFUSED.search(str(e))
        if refused is None:  # torch's format, but a pickle stream the unpickler cannot parse
            raise ValueError(f"{path} {NOT_TORCH}: torch.load: {_reason(e)}") from None
        what = (f"a pickled {refused.group(1)} object" if refused.group(1) else
                "pickled objects other than tensors")
        raise ValueError(f"{path}: refused to load: it holds {what}, and foreign checkpoints are "
                         f"read with torch.load(weights_only=True), which never runs code from the "
                         f"file. If you trust the file, re-save just its state dict as "
                         f"{{'model': state_dict}} in a separate step and convert that") from None
    except (MemoryError, OSError):
        raise
    except Exception as e:  # noqa: BLE001 - a file in torch's format that torch cannot read is damaged
        raise ValueError(f"{path} {NOT_TORCH}: torch.load: {_reason(e)}") from None
    if family is not None:
        check_family(obj, path, family)
    return obj, path


def _checkpoint_file(path: Path) -> Path:
    if path.is_dir():
        if not (path / "consolidated.pth").is_file():
            raise FileNotFoundError(f"{path} is a folder without consolidated.pth; pass the "
                                    f"checkpoint file itself")
        path = path / "consolidated.pth"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; download it first (see "
                                f"docs/reproducing.md)")
    return path


NOT_TORCH = "is not a PyTorch checkpoint (corrupt, truncated, or another kind of file)"
# torch.save's legacy (non-zip) files open with the pickled magic number 0x1950a86a20f9469cfc6c
_LEGACY_MAGIC = b"\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# what the weights-only unpickler says when the stream is sound but holds an object it refuses
_REFUSED = re.compile(r"GLOBAL ([\w.]+)|unrecognized function|Can only (?:create|build)|"
                      r"must be imported")


def _unlike_torch(path: Path) -> str:
    """'' for a file in one of torch.save's formats (a zip holding data.pkl, or the legacy
    pickle stream behind torch's magic number); otherwise what the file is instead. Telling
    them apart by their bytes keeps random bytes and text away from any unpickler, and an
    error from one away from the advice meant for checkpoints that hold foreign objects."""
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        return "it is empty (0 bytes); download it again"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                if any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist()):
                    return ""
        except zipfile.BadZipFile:
            pass
        return "it is a zip archive without the data.pkl that torch.save writes"
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head[:32]:
        return ""
    if head.startswith(b"PK\x03\x04"):
        return "it is a truncated or damaged zip archive; download it again"
    if head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size:
        return ("it is a safetensors file (argen's own weights, or another project's export); "
                "the converters read the released .pt/.pth checkpoints")
    if head.startswith(b"version https://git-lfs"):
        return "it is a Git LFS pointer, not the file it points to; fetch it with `git lfs pull`"
    return f"its first bytes {head[:8]!r} are neither torch.save's zip nor its legacy header"


def _reason(e: Exception) -> str:
    """The line of an exception's text that says what failed (torch wraps the unpickler's in
    paragraphs of advice); the exception's type where its text is empty."""
    text = str(e)
    found = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
    lines = [found.group(1)] if found else [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(e).__name__


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


@dataclass(frozen=True)
class Family:
    """A released family of checkpoints, told by key prefixes only its state dicts have."""
    name: str  # as messages name it: "LlamaGen GPT"
    a: str  # the name with its article: "a LlamaGen GPT"
    command: str  # the converter of its checkpoints; "" where argen has none
    needs: tuple[str, ...]  # key prefixes that are all present
    lacks: tuple[str, ...] = ()  # key prefixes of a close relative's, all absent

    def fits(self, keys: list[str]) -> bool:
        def has(prefix):
            return any(k.startswith(prefix) for k in keys)
        return all(map(has, self.needs)) and not any(map(has, self.lacks))


FAMILIES = {
    "llamagen-gpt": Family("LlamaGen GPT", "a LlamaGen GPT", "python -m convert.llamagen gpt",
                           ("tok_embeddings.weight", "layers.0.attention.wqkv.weight"),
                           ("cls_embedding.cap_proj.", "pos_instruct_embeddings")),
    "llamagen-t2i": Family("LlamaGen text-to-image GPT", "a LlamaGen text-to-image GPT", "",
                           ("tok_embeddings.weight", "cls_embedding.cap_proj.")),
    "randar": Family("RandAR", "a RandAR", "",
                     ("tok_embeddings.weight", "pos_instruct_embeddings")),
    "arpg": Family("ARPG", "an ARPG", "", ("layers.self_dec.0.", "layers.cross_dec.0.")),
    "llamagen-vq": Family("LlamaGen VQ tokenizer", "a LlamaGen VQ tokenizer",
                          "python -m convert.llamagen vq",
                          ("encoder.conv_blocks.0.", "quantize.embedding.weight")),
    "var": Family("VAR transformer", "a VAR transformer", "python -m convert.var var",
                  ("word_embed.weight", "blocks.0.attn.mat_qkv.weight")),
    "var-vqvae": Family("VAR VQVAE", "a VAR VQVAE", "python -m convert.var vqvae",
                        ("encoder.down.0.block.0.", "quantize.embedding.weight")),
    "mar-vae": Family("MAR KL-16 VAE", "a MAR KL-16 VAE", "python -m convert.mar_vae",
                      ("encoder.down.0.block.0.", "post_quant_conv.weight"), ("quantize.",)),
    "xar": Family("xAR", "an xAR", "python -m convert.xar",
                  ("z_proj.weight", "encoder_blocks.0.", "decoder_blocks.0.")),
}


def _unwrapped(key: str) -> str:
    return re.sub(r"^(module\.|_orig_mod\.)+", "", key)  # a DDP / torch.compile wrapper's prefix


def guess_family(state) -> Family | None:
    """The one family whose characteristic keys `state` (a state dict, or its key names) has;
    None when none or several fit (no advice beats wrong advice)."""
    keys = [_unwrapped(k) for k in state]
    found = [f for f in FAMILIES.values() if f.fits(keys)]
    return found[0] if len(found) == 1 else None


def _is_state(d) -> bool:
    return isinstance(d, dict) and bool(d) and all(torch.is_tensor(v) for v in d.values())


def _state_like(obj) -> dict:
    """The dict of tensors in a loaded file: the file itself, or its first entry that is one
    ({"model": ...}, {"state_dict": ...}, ...); {} when there is none."""
    if _is_state(obj):
        return obj
    return next((v for v in obj.values() if _is_state(v)), {}) if isinstance(obj, dict) else {}


def check_family(obj, path: Path, family: str) -> None:
    """Refuse a checkpoint of another known family, naming the command that converts it."""
    state = _state_like(obj)
    found, expected = guess_family(state), FAMILIES[family]
    if found is None or found is expected:
        return
    keys = sorted(state)
    shown = [next(k for k in keys if _unwrapped(k).startswith(p)) for p in found.needs]
    advice = (f"convert it with `{found.command}`" if found.command else
              f"argen has no converter for {found.name} checkpoints")
    raise ValueError(f"{path}: not {expected.a} state dict: its keys ({', '.join(shown)}) are "
                     f"those of {found.a} checkpoint; {advice}")


def checkpoint_args(obj) -> dict:
    """The training arguments pickled beside the weights (LlamaGen's and xAR's `args`, an
    argparse.Namespace of plain values) as a dict; {} when the file has none."""
    args = obj.get("args") if isinstance(obj, dict) else None
    return dict(vars(args)) if isinstance(args, argparse.Namespace) else {}


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
    ckpt=IN.ckpt out=OUT.safetensors); more bare arguments than names are a one-line error."""
    bare = [a for a in args if "=" not in a and not a.startswith("-")]
    if len(bare) > len(names):
        sys.exit(f"error: expected at most {len(names)} paths ({' '.join(names)}), got {bare}; "
                 f"give the rest as key=value (--help lists the keys)")
    return [f"{k}={v}" for k, v in zip(names, bare)] + [a for a in args if a not in bare]


def run_converter(convert, schema, doc: str, argv: list[str] | None) -> Path:
    """A converter's `main`: bare paths are ckpt then out, the rest key=value; any error is
    one line naming what to fix (common.config.run_cli)."""
    args = positional(list(sys.argv[1:] if argv is None else argv), ("ckpt", "out"), doc)
    return run_cli(convert, schema, doc, args)


def run_commands(commands: dict, doc: str, argv: list[str] | None) -> Path:
    """The `main` of a converter with several kinds (`convert.llamagen gpt|vq ...`): the first
    word picks (schema, convert) from `commands`, the rest is as for run_converter; --help in
    its place prints the usage (after the kind, that kind's keys)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        print(doc.strip() + f"\n\nKinds: {', '.join(sorted(commands))}; "
                            f"`KIND --help` lists a kind's keys.")
        sys.exit(0)
    if not args or args[0] not in commands:
        sys.exit(f"error: the first argument must be one of {sorted(commands)} "
                 f"(--help shows the usage)")
    schema, convert = commands[args[0]]
    return run_converter(convert, schema, doc, args[1:])
