"""Typed configuration: OmegaConf structured configs built from dataclasses.

Every entry point takes `--config FILE.yaml` (repeatable, merged in order) followed by
`key=value` overrides, e.g.

    python train_gen.py --config configs/quickstart.yaml train.max_steps=200 model.size=AR-B

Unknown keys and values of the wrong type are errors that name the file (or the command line),
the key, and the closest valid keys. `--help` lists every field with its one-line comment, read
from the dataclass source so the documentation cannot drift from the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException,
                               ValidationError)

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem, with the file/key/value named in the message."""


def _all_keys(schema: type, prefix: str = "") -> list[str]:
    """Dotted paths of every field of a (nested) dataclass schema."""
    keys = []
    for f in dataclasses.fields(schema):
        path = f"{prefix}{f.name}"
        keys.append(path)
        sub = _dataclass_type(schema, f)
        if sub is not None:
            keys.extend(_all_keys(sub, path + "."))
    return keys


def _dataclass_type(schema: type, f: dataclasses.Field) -> type | None:
    hints = _hints(schema)
    t = hints.get(f.name)
    return t if isinstance(t, type) and dataclasses.is_dataclass(t) else None


def _hints(schema: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(schema)


def _explain(err: OmegaConfBaseException, schema: type, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        close = difflib.get_close_matches(key, _all_keys(schema), n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        return ConfigError(
            f"{source}: unknown config key '{key}'.{hint} "
            f"Run the script with --help to list every valid key."
        )
    if isinstance(err, MissingMandatoryValue):
        return ConfigError(f"{source}: '{key}' is required; set it in a config file or as {key}=...")
    if isinstance(err, ValidationError):
        first = str(err).splitlines()[0]
        return ConfigError(f"{source}: bad value for '{key}': {first}")
    return ConfigError(f"{source}: {str(err).splitlines()[0]} (key '{key}')")


def _validate(cfg: Any, source: str) -> None:
    """Call `validate()` on every nested config object that defines one."""
    if dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            _validate(getattr(cfg, f.name), source)
        if hasattr(cfg, "validate"):
            try:
                cfg.validate()
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None


def load_config(schema: type[T], files: Sequence[str | Path] = (),
                overrides: Sequence[str] = ()) -> T:
    """Merge YAML files (in order) then `key=value` overrides onto the schema's defaults."""
    merged: DictConfig = OmegaConf.structured(schema)
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml syntax errors
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if loaded is None:
            continue
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"{path}: expected a mapping of keys at the top level")
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as e:
            raise _explain(e, schema, str(path)) from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"command line: expected key=value overrides, got {bad}")
    try:
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as e:
        raise _explain(e, schema, "command line") from None
    try:
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _explain(e, schema, "config") from None
    sources = ", ".join(str(f) for f in files) or "defaults"
    _validate(obj, f"config ({sources}{' + overrides' if overrides else ''})")
    return obj  # type: ignore[return-value]


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text (what run directories and weights files carry)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_yaml(schema: type[T], text: str, source: str = "stored config") -> T:
    """Rebuild a config object from YAML text written by `to_yaml`, strictly."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(text))
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise _explain(e, schema, source) from None


def describe(schema: type, prefix: str = "") -> list[str]:
    """`key: type = default  # comment` for every field, comments read from the source."""
    comments = _field_comments(schema)
    hints = _hints(schema)
    lines = []
    for f in dataclasses.fields(schema):
        sub = _dataclass_type(schema, f)
        if sub is not None:
            lines.append(f"{prefix}{f.name}:  # {comments.get(f.name, '')}".rstrip(" #:") + ":")
            lines.extend(describe(sub, prefix + "  "))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = "???"
        tname = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
        lines.append(f"{prefix}{f.name}: {tname} = {default!r}  # {comments.get(f.name, '')}")
    return lines


_FIELD_RE = re.compile(r"^\s+(\w+)\s*:[^#]*#\s*(.*)$")


def _field_comments(schema: type) -> dict[str, str]:
    try:
        src = inspect.getsource(schema)
    except (OSError, TypeError):
        return {}
    out = {}
    for line in src.splitlines():
        m = _FIELD_RE.match(line)
        if m:
            out.setdefault(m.group(1), m.group(2).strip())
    return out


def parse_cli(schema: type[T], argv: Iterable[str] | None = None, doc: str = "") -> T:
    """Parse `[--config FILE]... [key=value]...` into a validated config object.

    Exits with the error message (no traceback) on a configuration error, since it is the
    user's input that is wrong, not the program.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    files, overrides = [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            print((doc or "").strip() + "\n\nConfig keys (set in YAML or as key=value):")
            print("\n".join("  " + line for line in describe(schema)))
            sys.exit(0)
        if a == "--config":
            if i + 1 >= len(args):
                sys.exit("error: --config needs a file path")
            files.append(args[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            files.append(a.split("=", 1)[1])
        elif a.startswith("--"):
            sys.exit(f"error: unknown option {a!r}; options are --config FILE and key=value overrides")
        else:
            overrides.append(a)
        i += 1
    try:
        return load_config(schema, files, overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")
