"""Typed configuration: OmegaConf structured configs built from dataclasses.

Every entry point takes `--config FILE.yaml` (repeatable, merged in order; a file may name
`base: OTHER.yaml` files to start from, common/config_files.py) followed by `key=value`
overrides, e.g.

    python train_gen.py --config configs/quickstart.yaml train.max_steps=200 model.size=AR-B

Unknown keys and values of the wrong type are errors that name the file (or the command line),
the key, and the closest valid keys. `--help` lists every field with its one-line comment, read
from the dataclass source so the documentation cannot drift from the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import (ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException,
                               ValidationError)

from common.config_files import ConfigError, files_to_merge

T = TypeVar("T")


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


def upgrade_legacy(schema: type, raw: dict, context: Any = None,
                   warn: Callable[[str], None] | None = None) -> dict:
    """Rewrite, in place, the keys a schema has moved since they were written: a config class
    may define `upgrade_legacy(raw, context) -> notes` for its own node (`context`: the values
    merged so far at that node, or None); nested sections are visited too. `warn` gets one
    deprecation note per moved key (user files); stored configs are upgraded silently."""
    hook = getattr(schema, "upgrade_legacy", None)
    if hook is not None:
        for note in hook(raw, context):
            if warn is not None:
                warn(note)
    for f in dataclasses.fields(schema):
        sub = _dataclass_type(schema, f)
        if sub is not None and isinstance(raw.get(f.name), dict):
            inner = context.get(f.name) if context is not None else None
            upgrade_legacy(sub, raw[f.name], inner, warn)
    return raw


def _upgraded(schema: type, node: DictConfig, merged: DictConfig | None, source: str) -> DictConfig:
    """A file's or the command line's keys with moved keys rewritten (and a note each)."""
    raw = OmegaConf.to_container(node, resolve=False)
    warn = lambda note: print(f"warning: {source}: {note}", file=sys.stderr)  # noqa: E731
    return OmegaConf.create(upgrade_legacy(schema, raw, merged, warn))


def load_config(schema: type[T], files: Sequence[str | Path] = (),
                overrides: Sequence[str] = ()) -> T:
    """Merge YAML files (in order, each after its `base:` files) then `key=value` overrides onto
    the schema's defaults."""
    merged: DictConfig = OmegaConf.structured(schema)
    seen: set[Path] = set()  # bases merged so far: each is merged once
    for path, loaded in (pair for f in files for pair in files_to_merge(f, seen)):
        try:
            merged = OmegaConf.merge(merged, _upgraded(schema, loaded, merged, str(path)))
        except OmegaConfBaseException as e:
            raise _explain(e, schema, str(path)) from None
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ConfigError(f"command line: expected key=value overrides, got {bad}")
    try:
        command_line = OmegaConf.from_dotlist(list(overrides))
        merged = OmegaConf.merge(merged, _upgraded(schema, command_line, merged, "command line"))
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
        stored = OmegaConf.to_container(OmegaConf.create(text))
        stored = upgrade_legacy(schema, stored) if isinstance(stored, dict) else stored
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(stored))
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
    """Each field's one-line comment, read from the class's source and its bases' (a config
    may extend another, as SamplingConfig extends the heads' DrawSettings)."""
    out = {}
    for cls in schema.__mro__:
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            src = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
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
        if a == "--debug":  # read by run_cli
            pass
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
        elif a.startswith("--"):
            sys.exit(f"error: unknown option {a!r}; options are --config FILE, --debug and "
                     f"key=value overrides")
        else:
            overrides.append(a)
        i += 1
    try:
        return load_config(schema, files, overrides)
    except ConfigError as e:
        sys.exit(f"error: {e}")


def error_line(exc: BaseException) -> str:
    """One line for the user: the message our errors carry (file, key or value, what to do);
    anything else keeps its type name, since it was not written for the user."""
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    elif isinstance(exc, (ValueError, OSError, RuntimeError, TypeError)):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    return " ".join(text.split()) or type(exc).__name__


def run_cli(main: Callable[[T], Any], schema: type[T], doc: str = "",
            argv: Iterable[str] | None = None) -> Any:
    """The `__main__` of every entry script: parse the command line, run `main(cfg)`, and turn
    any error into one line on stderr and exit code 1, without a traceback (the messages name
    the file, key or value and what to do). `--debug` re-raises, showing the traceback."""
    args = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_cli(schema, args, doc)
    try:
        return main(cfg)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - every failure of a command ends in one line
        if "--debug" in args:
            raise
        sys.exit(f"error: {error_line(e)}  (--debug shows the traceback)")


# ------------------------------------------------------------------------- range checks

_INTERVAL_RE = re.compile(r"^([\[(])\s*(\S+)\s*,\s*(\S+)\s*([\])])$")
_BOUND_RE = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")


def _in_range(value: Any, rule: str | tuple) -> bool:
    if isinstance(rule, tuple):
        return value in rule
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN
        return False
    m = _BOUND_RE.match(rule)
    if m:
        op, bound = m.group(1), float(m.group(2))
        return {">=": value >= bound, ">": value > bound, "<=": value <= bound, "<": value < bound}[op]
    m = _INTERVAL_RE.match(rule)
    if not m:
        raise ValueError(f"bad range rule {rule!r}")
    lo, hi = float(m.group(2)), float(m.group(3))
    return (value >= lo if m.group(1) == "[" else value > lo) and \
        (value <= hi if m.group(4) == "]" else value < hi)


def check_fields(cfg: Any, prefix: str, rules: dict[str, str | tuple]) -> None:
    """Range-check fields of a config object, naming the key, the value and what is allowed.

    A rule is a bound (">= 1", "> 0"), an interval ("[0, 1)", "(0, 1]") or a tuple of choices;
    a field that is None (an optional value left unset) passes.
    """
    for key, rule in rules.items():
        value = getattr(cfg, key)
        if value is None or _in_range(value, rule):
            continue
        allowed = f"one of {', '.join(map(str, rule))}" if isinstance(rule, tuple) else \
            (rule if rule[0] in "<>" else f"in {rule}")
        raise ConfigError(f"{prefix}{key}={value!r} is out of range: it must be {allowed}")


def check_paths(cfg: Any, paths: dict[str, str]) -> None:
    """Input paths that must exist, checked before any work: {dotted key: how to make it}."""
    for key, how in paths.items():
        value: Any = cfg
        for part in key.split("."):
            value = getattr(value, part)
        if value and not Path(value).exists():
            raise ConfigError(f"{key}={value} not found; {how}")


def recorded_differences(stored: dict, now: dict, meanings: dict[str, str] | None = None) -> list[str]:
    """'key: checkpoint A, now B' for every (dotted) key a checkpoint recorded whose value now
    differs, followed by what that means where `meanings` says (a key or a section above it).
    A key the checkpoint lacks is a setting added since it was written, whose default keeps
    the old behaviour, so only what it recorded is compared. Hashes are shortened to 12 digits."""
    flat_stored, flat_now = _flatten(stored), _flatten(json.loads(json.dumps(now)))  # tuples -> lists
    lines = []
    for k in sorted(flat_stored):
        if flat_stored[k] == flat_now.get(k):
            continue
        line = f"{k}: checkpoint {_shown(flat_stored[k])}, now {_shown(flat_now.get(k, '(absent)'))}"
        why = [m for key, m in (meanings or {}).items() if k == key or k.startswith(key + ".")]
        lines.append(f"{line} ({why[0]})" if why else line)
    return lines


def _shown(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return repr(value[:12] + "...")
    return repr(value)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
