"""Reading config files: YAML syntax, a mapping at the top level, and `base:` inheritance.

A file may start from other files: a top-level `base: OTHER.yaml` (a path relative to the file
itself) or a list of them, merged in order before the file's own keys; a base may have its own
base. `files_to_merge` lists a file's whole chain, bases first, with `base` consumed, so that the
loader merges (and checks against the schema) each file's own keys under that file's name.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A configuration problem, with the file/key/value named in the message."""


def read_file(path: Path) -> DictConfig | None:
    """A config file's keys (None for an empty file); a missing file, bad YAML or a top level
    that is not a mapping is an error naming the file."""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml syntax errors
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if loaded is not None and not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return loaded


def _bases(path: Path, node: DictConfig) -> list[str]:
    """The file's `base` entries (removed from `node`), checked to be paths."""
    if "base" not in node:
        return []
    value = OmegaConf.to_container(node, resolve=False)["base"]  # type: ignore[index]
    del node["base"]
    entries = value if isinstance(value, list) else [value]
    if not all(isinstance(b, str) and b for b in entries):
        raise ConfigError(f"{path}: base={value!r}: expected a file path (relative to this "
                          f"file) or a list of them")
    return entries


def files_to_merge(path: str | Path, seen: set[Path] | None = None,
                   _stack: tuple[Path, ...] = ()) -> list[tuple[Path, DictConfig]]:
    """(file, its own keys) for `path` and its bases, bases first, `base` removed. A base met
    before in this load (`seen`, shared across the files of one load) is not merged again; a
    missing base and a cycle are errors naming the file and the base."""
    path = Path(path)
    seen = set() if seen is None else seen
    node = read_file(path)
    if node is None:
        return []
    chain: list[tuple[Path, DictConfig]] = []
    here = _stack + (path.resolve(),)
    for base in _bases(path, node):
        target = path.parent / base
        if not target.is_file():
            raise ConfigError(f"{path}: base file not found: {base} (looked for {target})")
        key = target.resolve()
        if key in here:
            cycle = " -> ".join(str(p.name) for p in here[here.index(key):] + (key,))
            raise ConfigError(f"{path}: base {base} forms a cycle ({cycle})")
        if key in seen:
            continue
        chain.extend(files_to_merge(target, seen, here))
        seen.add(key)
    return chain + [(path, node)]
