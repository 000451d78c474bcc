"""The pages (README.md and docs/*.md) cannot go stale unnoticed.

For every ```bash block of every page, each command line (continuations joined, comments
dropped) is checked:
  1. its program exists: `python train_gen.py|sample.py|eval_fid.py|reproduce.py`, `python -m
     MODULE` for a module file of the repository, `python SCRIPT` for a script of it, `make
     TARGET` for a target of the Makefile, `torchrun [options] SCRIPT | -m MODULE`, or a program
     of the small allowlist (pip, git, ...);
  2. its keys exist: every `key=value` argument of an entry with a config schema (SCHEMAS, and
     the bench scripts' own) must be a key of that schema, not a section and not a key the
     schema has moved (common.config.upgrade_legacy's notes); then the arguments are merged
     onto the schema with the command's `--config` files by `common.config.load_config`, as the
     command would do, and bad values and range errors are reported (placeholder values such as
     `N`, `PATH`, `sjd|coupled|gsd` are left out of the merge, and what needs files on disk,
     e.g. a dataset folder that exists, is not checked);
  3. the files it names exist: `--config FILE` and every argument that is a repository path.
In the prose: every backticked repository path (`ar/orders.py`, `configs/...yaml`, brace lists
and globs expanded) and every relative markdown link (with its #anchor) must exist; every
backticked `key=value`, and every backticked `model.x` / `train.x` / `sampling.x` ... name, must
be a key of some entry's schema (or, for `model.x`, an attribute of ARModel); every backticked
CamelCase name must be defined in the repository (a few other projects' names excepted); every
table row that names a registry (`ar/orders.py` `ORDERS`) must list entries that registry
holds; and the README's layout must name every folder, and every Python file of each folder
whose files it lists. Paths of what a run makes (runs/, data/, weights/, pretrained_models/,
results/, samples/), placeholders in capitals (RUN, OUT) and other projects' files
(`../shared/...`) are skipped; other projects' paths are written without backticks.

A problem is reported as `PAGE:LINE: what is wrong`.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import itertools
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Callable, Sequence

import pytest

from conftest import ROOT
from common.config import ConfigError, _all_keys, load_config

DOCS = ROOT / "docs"
PAGES = ["README.md"] + sorted(f"docs/{p.name}" for p in DOCS.glob("*.md"))
# the pages the issue asks for (docs/README-style index: README.md links to each)
EXPECTED_DOCS = ["pipeline.md", "next-token.md", "next-x-orders.md", "flow.md", "next-scale.md",
                 "speculative.md", "text-and-token-shuffle.md", "reproducing.md", "evaluation.md",
                 "training-at-scale.md", "benchmarks.md", "architecture.md", "experiments.md"]
METHOD_PAGES = ["next-token.md", "next-x-orders.md", "flow.md", "next-scale.md", "speculative.md",
                "text-and-token-shuffle.md"]
README_MAX_LINES = 250

PYTHONS = {"python", "python3", ".venv/bin/python"}
ALLOWED_PROGRAMS = {"pip", "git", "cd", "export", "ls", "cat", "mkdir", "tensorboard", "nvidia-smi"}
EXTERNAL_MODULES = {"pytest", "pyflakes", "pip", "torch.distributed.run", "tensorboard"}
# torchrun's options that take a value as the next word (`--nnodes 2`); `--x=y` needs none
TORCHRUN_VALUED = {"--nnodes", "--nproc_per_node", "--nproc-per-node", "--node_rank", "--node-rank",
                   "--master_addr", "--master-addr", "--master_port", "--master-port",
                   "--rdzv_endpoint", "--rdzv-endpoint", "--rdzv_backend", "--rdzv-backend",
                   "--rdzv_id", "--rdzv-id", "--max_restarts", "--max-restarts"}
# where what runs make lives (and other projects' files): not repository paths
SKIP_PREFIXES = ("runs/", "data/", "weights/", "pretrained_models/", "results/", "samples/",
                 ".venv/", "../", "./runs/", "/", "~", "$")
FILE_SUFFIX = re.compile(r"\.(?:png|jsonl?|npz|npy|ya?ml|py|md|txt|pth?|ckpt|safetensors)$")
PLACEHOLDER_WORD = re.compile(r"^[A-Z][A-Z0-9_]*$")  # RUN, OUT, ROOT, PATH, KKKKK


# ------------------------------------------------------------------------ the schemas

def _schema(module: str, name: str) -> Callable[[list[str]], type]:
    return lambda args: getattr(importlib.import_module(module), name)


def _tokenizer_train(args: list[str]) -> type:
    from tokenizer.train import schema_for

    return schema_for(args)


def _kinds(module: str) -> Callable[[list[str]], type]:
    """A converter whose first word picks the kind (`convert.llamagen gpt ...`)."""
    def pick(args: list[str]) -> type:
        commands = importlib.import_module(module).COMMANDS
        if not args or args[0] not in commands:
            raise ValueError(f"`python -m {module}` needs a kind first, one of {sorted(commands)}")
        return commands[args[0]][0]
    return pick


# entry (script path or module name) -> (schema from the arguments, bare words it takes)
SCHEMAS: dict[str, tuple[Callable[[list[str]], type], tuple[str, ...]]] = {
    "train_gen.py": (_schema("train_gen", "RunConfig"), ()),
    "sample.py": (_schema("sampling.run", "SampleRunConfig"), ()),
    "eval_fid.py": (_schema("eval_fid", "EvalConfig"), ()),
    "reproduce.py": (_schema("reproduce", "ReproduceConfig"), ()),
    "tokenizer.train": (_tokenizer_train, ()),
    "tokenizer.encode": (_schema("tokenizer.encode", "EncodeConfig"), ()),
    "dataset.shapes": (_schema("dataset.shapes", "ShapesConfig"), ()),
    "evaluation.prompt_follow": (_schema("evaluation.prompt_follow", "PromptFollowConfig"), ()),
    "convert.llamagen": (_kinds("convert.llamagen"), ("kind", "ckpt", "out")),
    "convert.var": (_kinds("convert.var"), ("kind", "ckpt", "out")),
    "convert.mar_vae": (_schema("convert.mar_vae", "MarVAEConvertConfig"), ("ckpt", "out")),
    "convert.xar": (_schema("convert.xar", "XARConvertConfig"), ("ckpt", "out")),
    "scripts/get_inception.py": (_schema("scripts.get_inception", "GetInceptionConfig"), ()),
}


def _script_schema(script: str):
    """A bench script's schema: the class its `__main__` hands to parse_cli."""
    m = re.search(r"parse_cli\((\w+)", (ROOT / script).read_text())
    if not m:
        return None
    module = script[:-3].replace("/", ".")
    return (lambda args: getattr(importlib.import_module(module), m.group(1))), ()


def schema_entry(entry: str):
    if entry in SCHEMAS:
        return SCHEMAS[entry]
    if entry.startswith("bench/") and entry.endswith(".py"):
        return _script_schema(entry)
    return None


@functools.lru_cache(maxsize=None)
def every_key() -> frozenset[str]:
    """The keys of every entry's schema (all tokenizer and converter kinds)."""
    from tokenizer import TOKENIZERS

    schemas = [_tokenizer_train([f"model.name={name}"]) for name in TOKENIZERS]
    for entry, (pick, _) in SCHEMAS.items():
        if pick is _tokenizer_train:
            continue
        if entry in ("convert.llamagen", "convert.var"):
            schemas += [c[0] for c in importlib.import_module(entry).COMMANDS.values()]
        else:
            schemas.append(pick([]))
    for script in sorted(ROOT.glob("bench/*.py")):
        found = _script_schema(f"bench/{script.name}")
        if found:
            schemas.append(found[0]([]))
    return frozenset(k for s in schemas for k in _all_keys(s))


def known_key(key: str, keys: frozenset[str] | set[str]) -> bool:
    """A key of some schema, or the end of one (`cfg_scale=1.5` for sampling.cfg_scale)."""
    return key in keys or any(k.endswith("." + key) for k in keys)


def sections(keys: frozenset[str] | set[str]) -> set[str]:
    """The keys that are sections (model.order), which take keys, not a value."""
    return {k.rsplit(".", 1)[0] for k in keys if "." in k}


# the config sections a backticked `a.b` in the prose is read as a key of (`model.extend`, a
# method, is told apart by the class it names)
KEY_SECTIONS = ("model", "train", "sampling", "speculative", "data", "text", "grid")


def known_name(token: str, keys: frozenset[str]) -> bool:
    """A backticked dotted name of the prose: a config key, or an attribute of the model."""
    if known_key(token, keys):
        return True
    first, _, rest = token.partition(".")
    if first == "model" and "." not in rest:
        from ar.model import ARModel

        return hasattr(ARModel, rest)
    return False


def moved_to(token: str) -> str:
    """'; model.cell is now model.order.cell' where the generator's schema has moved the key."""
    if not token.startswith("model."):
        return ""
    notes = legacy_notes(SCHEMAS["train_gen.py"][0]([]), [token if "=" in token else token + "=1"])
    return f" ({'; '.join(notes)})" if notes else ""


def legacy_notes(schema: type, overrides: list[str]) -> list[str]:
    """What the schema says of keys it has moved (`model.cell` is now `model.order.cell`)."""
    from omegaconf import OmegaConf

    import common.config as config

    upgrade = getattr(config, "upgrade_legacy", None)
    if upgrade is None:
        return []
    notes: list[str] = []
    try:
        raw = OmegaConf.to_container(OmegaConf.from_dotlist(overrides), resolve=False)
    except Exception:  # noqa: BLE001 - bad overrides are reported by load_config
        return []
    upgrade(schema, raw, None, notes.append)
    return notes


# ------------------------------------------------------------------------ reading pages

def bash_commands(text: str) -> list[tuple[int, str]]:
    """(line number, command) of every command line of the ```bash blocks: continuations
    joined, comment lines dropped (a trailing comment is dropped by shlex later)."""
    out, in_bash, pending, start = [], False, "", 0
    for no, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not in_bash:
            in_bash = stripped == "```bash"
            continue
        if stripped.startswith("```"):
            in_bash = False
            continue
        if not pending:
            start = no
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        command, pending = (pending + stripped).strip(), ""
        if command and not command.startswith("#"):
            out.append((start, command))
    return out


def prose_lines(text: str):
    """(line number, line) of every line outside fenced blocks."""
    fenced = False
    for no, line in enumerate(text.splitlines(), 1):
        if line.strip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            yield no, line


def headings(text: str) -> set[str]:
    """GitHub's anchors of the page's headings."""
    anchors = set()
    for _, line in prose_lines(text):
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            title = m.group(1).strip().lower().replace("`", "")
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


# ------------------------------------------------------------------------ paths

@functools.lru_cache(maxsize=None)
def tracked() -> tuple[str, ...]:
    """The repository's files: tracked, or new and not ignored (a copy without git: walked)."""
    run = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True)
    if run.returncode == 0:
        return tuple(run.stdout.splitlines())
    skip = {".git", ".venv", "runs", "data", "__pycache__"}
    found = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip]
        found += [str(Path(folder, n).relative_to(ROOT)) for n in names]
    return tuple(found)


def expand_braces(path: str) -> list[str]:
    """`configs/imagenet256/AR-{B,L,XL}.yaml` -> its three paths."""
    parts = re.split(r"(\{[^{}]*\})", path)
    options = [p[1:-1].split(",") if p.startswith("{") else [p] for p in parts]
    return ["".join(c) for c in itertools.product(*options)]


def skipped_path(path: str) -> bool:
    return path.startswith(SKIP_PREFIXES) or any(PLACEHOLDER_WORD.match(part) for part in path.split("/"))


def path_exists(path: str, files: Sequence[str]) -> bool:
    """A repository file or folder (globs: at least one match)."""
    path = path.rstrip("/")
    for one in expand_braces(path):
        if any(c in one for c in "*?["):
            if not any(fnmatch.fnmatch(f, one) for f in files):
                return False
        elif not (ROOT / one).exists() and not any(f.startswith(one + "/") for f in files):
            return False
    return True


REPO_PATH = re.compile(r"^\.?[\w\-{},*]+(?:/[\w.\-{},*]*)+$")  # a/b/c, .ci/run; no dots before the first /
FILE_NAME = re.compile(r"^[\w\-]+\.(?:py|md|yaml|toml|txt)$")


def check_path(token: str, files: Sequence[str], basenames: set[str]) -> str | None:
    """What is wrong with a path named in a page, or None (also for what is not a path)."""
    if REPO_PATH.match(token):
        if skipped_path(token) or path_exists(token, files):
            return None
        return f"names `{token}`, which is not in the repository"
    if FILE_NAME.match(token) and token not in basenames:
        return f"names the file `{token}`, which no file of the repository is called"
    return None


# ------------------------------------------------------------------------ commands

def placeholder(value: str) -> bool:
    """A value that stands for what the reader fills in."""
    return (value in ("", "...") or "..." in value or "|" in value or PLACEHOLDER_WORD.match(value) is not None
            or any(PLACEHOLDER_WORD.match(part) for part in value.split("/") if part))


# ConfigError texts that come from the state of the disk or from what a command leaves out
_NOT_OURS = re.compile(r"not found|is a file|not a folder|is a folder|needs out=|needs ref=")


def check_keys(entry: str, args: list[str], files: Sequence[str], basenames: set[str]) -> list[str]:
    """Problems of an entry's arguments: options, bare words, keys and values."""
    schema_of, bare_names = schema_entry(entry)
    problems, configs, overrides, bare = [], [], [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--config" and i + 1 < len(args):
            configs.append(args[i + 1])
            i += 2
            continue
        if a.startswith("--config="):
            configs.append(a.split("=", 1)[1])
        elif a in ("--help", "-h", "--debug"):
            pass
        elif a.startswith("-"):
            problems.append(f"`{entry}` has no option {a} (--config FILE, --help, --debug)")
        elif a == "..." or a.startswith("["):  # elided arguments, [key=value ...]
            pass
        elif "=" in a:
            overrides.append(a)
        else:
            bare.append(a)
        i += 1
    for path in configs:
        if not (ROOT / path).is_file():
            problems.append(f"--config {path}: no such file")
    if len(bare) > len(bare_names):
        problems.append(f"`{entry}` takes {len(bare_names)} bare words ({' '.join(bare_names)}), "
                        f"given {bare}")
    argv = [a for c in configs for a in ("--config", str(ROOT / c))] + overrides
    try:
        schema = schema_of(bare[:1] if bare_names[:1] == ("kind",) else argv)
    except ValueError as e:
        return problems + [str(e)]
    if bare_names[:1] == ("kind",):
        bare_names, bare = bare_names[1:], bare[1:]
    keys = set(_all_keys(schema))
    section_keys = sections(keys)
    named = [f"{k}={v}" for k, v in zip(bare_names, bare)]
    for a in overrides + named:
        key, value = a.split("=", 1)
        moved = legacy_notes(schema, [a])
        if moved:  # still read, with a warning: the page should say what the schema says now
            problems += [f"`{entry}`: an old key: {note}" for note in moved]
        elif key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=2, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"`{entry}` has no key '{key}'{hint}")
        elif key in section_keys:
            problems.append(f"`{entry}`: '{key}' is a section; give one of its keys")
        elif REPO_PATH.match(value) and not skipped_path(value) and not path_exists(value, files):
            problems.append(f"{key}={value}: no such file in the repository")
    if problems:
        return problems
    real = [a for a in overrides + named if not placeholder(a.split("=", 1)[1])]
    for _ in range(len(keys)):
        try:
            load_config(schema, [ROOT / c for c in configs], real)
        except ConfigError as e:
            required = re.search(r"'([\w.]+)' is required", str(e))
            if required:  # left out of the command (or a placeholder): give it a value, go on
                real.append(f"{required.group(1)}=x")
                continue
            if not _NOT_OURS.search(str(e)):
                problems.append(f"`{entry}` refuses its arguments: {e}")
        break
    return problems


def makefile_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return {t for line in text.splitlines() for t in re.findall(r"^([\w.\-]+)\s*:(?!=)", line)}


def module_file(module: str) -> bool:
    base = ROOT / module.replace(".", "/")
    return base.with_suffix(".py").is_file() or (base / "__main__.py").is_file()


def check_command(command: str, files: Sequence[str], basenames: set[str]) -> list[str]:
    """Problems of one command line of a bash block."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError as e:
        return [f"cannot read the command ({e})"]
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value before the program
        words = words[1:]
    if not words:
        return []
    program, rest = words[0], words[1:]
    if program == "make":
        targets = makefile_targets()
        return [f"make {t}: no such target in the Makefile" for t in rest
                if not t.startswith("-") and "=" not in t and t not in targets]
    if program == "torchrun":
        while rest and rest[0].startswith("--"):
            rest = rest[2:] if rest[0] in TORCHRUN_VALUED else rest[1:]
        if not rest:
            return ["torchrun without a script or -m MODULE"]
    elif program in PYTHONS:
        if not rest:
            return []
    elif program in ALLOWED_PROGRAMS:
        return []
    else:
        return [f"runs `{program}`, which is neither a script of the repository nor an allowed "
                f"program ({', '.join(sorted(PYTHONS | ALLOWED_PROGRAMS | {'make', 'torchrun'}))})"]
    if rest[0] == "-m":
        if len(rest) < 2:
            return ["-m without a module"]
        entry, args = rest[1], rest[2:]
        if entry in EXTERNAL_MODULES:
            return []
        if not module_file(entry):
            return [f"-m {entry}: no such module in the repository"]
    else:
        entry, args = rest[0], rest[1:]
        if not (ROOT / entry).is_file():
            return [f"{entry}: no such script in the repository"]
    if entry == "scripts/quickstart.py":
        from scripts.quickstart import PIPELINES

        return [f"scripts/quickstart.py has no pipeline {a!r} ({', '.join(PIPELINES)})"
                for a in args if a not in PIPELINES]
    if schema_entry(entry) is None:
        if any("=" in a for a in args):
            return [f"`{entry}` takes key=value arguments but tests/test_docs.py knows no schema "
                    f"for it: add it to SCHEMAS"]
        return []
    return check_keys(entry, args, files, basenames)


# ------------------------------------------------------------------------ class names

# CamelCase names of other projects the pages name in backticks
EXTERNAL_NAMES = {"AutoencoderKL", "FeatureExtractorInceptionV3", "Namespace", "SummaryWriter"}
CLASS_NAME = re.compile(r"^([A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*)(?:\.\w+)?$")


@functools.lru_cache(maxsize=None)
def defined_names(files: tuple[str, ...]) -> frozenset[str]:
    """Classes and module-level names defined in the repository's Python files."""
    names: set[str] = set()
    for f in files:
        if f.endswith(".py") and (ROOT / f).is_file():
            text = (ROOT / f).read_text(errors="replace")
            names.update(re.findall(r"^\s*class (\w+)", text, flags=re.M))
            names.update(re.findall(r"^(\w+)\s*(?::[^=]*)?=", text, flags=re.M))
    return frozenset(names)


def class_name(token: str) -> str | None:
    """The CamelCase name a backticked token names (`ShuffleInputs.blocks`: ShuffleInputs)."""
    m = CLASS_NAME.match(token)
    return m.group(1) if m and sum(c.isupper() for c in m.group(1)) >= 2 else None


# ------------------------------------------------------------------------ registries in maps

REGISTRY_ROW = re.compile(r"`([\w/]+\.py)`\s+`([A-Z_]+)`")


def registry(path: str, name: str):
    module = path[:-3].replace("/", ".").removesuffix(".__init__")
    return getattr(importlib.import_module(module), name, None)


# ------------------------------------------------------------------------ the README's layout

def layout_block(text: str) -> tuple[int, list[str]]:
    """(line number of its first line, lines) of the fenced block under '## Layout'."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "## Layout":
            start = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```")) + 1
            end = next(j for j in range(start, len(lines)) if lines[j].startswith("```"))
            return start + 1, lines[start:end]
    return 0, []


def check_layout(name: str, text: str, files: Sequence[str]) -> list[str]:
    """The layout names every folder of the repository and, for each folder whose files it
    lists, every Python file in it (sub-folders included); what it names exists."""
    first, lines = layout_block(text)
    if not lines:
        return []
    entries: list[tuple[int, str, str]] = []  # (line, folder or "" for the root line, text)
    for no, line in enumerate(lines, first):
        m = re.match(r"^([\w.]+/)\s+(.*)$", line)
        if m:
            entries.append((no, m.group(1), m.group(2)))
        elif line.startswith(" ") and entries:
            entries[-1] = (entries[-1][0], entries[-1][1], entries[-1][2] + " " + line.strip())
        elif line.strip():
            entries.append((no, "", line))
    problems, named_folders = [], set()
    for no, folder, body in entries:
        where = f"{name}:{no}: the layout"
        if folder:
            named_folders.add(folder.rstrip("/"))
            inside = [f for f in files if f.startswith(folder)]
            if not inside:
                problems.append(f"{where} names {folder}, which is not in the repository")
                continue
            listed = set(re.findall(r"\b(\w+\.py)\b", body))
            problems += [f"{where} names {folder}...{n}, which is not in {folder}" for n in sorted(listed)
                         if not any(Path(f).name == n for f in inside)]
            problems += [f"{where} names {folder}{sub}/, which does not exist" for sub in
                         re.findall(r"(?<![\w./])(\w+)/(?=[\s(]|$)", body) if not (ROOT / folder / sub).is_dir()]
            if listed:
                problems += [f"{where} leaves out {f}" for f in sorted(inside) if f.endswith(".py")
                             and Path(f).name != "__init__.py" and Path(f).name not in listed]
        else:
            for word in body.split():
                named_folders.add(word.rstrip("/"))
                if not (ROOT / word).exists():
                    problems.append(f"{where} names {word}, which is not in the repository")
    top = {f.split("/")[0] for f in files if "/" in f and not f.startswith(".")}
    top |= {f for f in files if "/" not in f and f.endswith(".py")}
    problems += [f"{name}:{first}: the layout leaves out {t}" for t in sorted(top - named_folders)]
    return problems


# ------------------------------------------------------------------------ one page

def check_page(name: str, text: str, pages: dict[str, str] | None = None) -> list[str]:
    """Every problem of one page, as 'PAGE:LINE: what'. `pages` (name -> text) resolves links."""
    files = tracked()
    basenames = {Path(f).name for f in files}
    keys = every_key()
    section_keys = sections(keys)
    names = defined_names(files)
    pages = pages if pages is not None else {}
    problems = []
    for no, command in bash_commands(text):
        problems += [f"{name}:{no}: {p}   [{command}]" for p in check_command(command, files, basenames)]
    problems += check_layout(name, text, files)
    folder = str(Path(name).parent)
    for no, line in prose_lines(text):
        for token in re.findall(r"`([^`\s]+)`", line):
            problem = check_path(token, files, basenames)
            if problem:
                problems.append(f"{name}:{no}: {problem}")
            cls = class_name(token)
            if cls and cls not in names and cls not in EXTERNAL_NAMES:
                problems.append(f"{name}:{no}: `{token}`: no class or name `{cls}` is defined in the repository")
            m = re.match(r"^([a-z_]+(?:\.[a-z_0-9]+)*)=", token)
            if m and token != "key=value":
                if not known_key(m.group(1), keys):
                    problems.append(f"{name}:{no}: `{token}`: '{m.group(1)}' is no key of any entry's "
                                    f"schema{moved_to(token)}")
                elif m.group(1) in section_keys:
                    problems.append(f"{name}:{no}: `{token}`: '{m.group(1)}' is a section, not a "
                                    f"key{moved_to(token)}")
            elif re.match(r"^[a-z_]+(?:\.[a-z_0-9]+)+$", token) and token.split(".")[0] in KEY_SECTIONS \
                    and not FILE_SUFFIX.search(token) and not known_name(token, keys):
                problems.append(f"{name}:{no}: `{token}` is no key of any entry's schema{moved_to(token)}")
        for target in re.findall(r"\]\(([^)\s]+)\)", line):
            if re.match(r"^[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            page = str(Path(folder, path)) if path else name
            page = page.removeprefix("./")
            if path and not (ROOT / page).exists():
                problems.append(f"{name}:{no}: links to {target}, which does not exist")
            elif anchor and page.endswith(".md"):
                linked = pages.get(page, (ROOT / page).read_text() if (ROOT / page).is_file() else "")
                if anchor not in headings(linked):
                    problems.append(f"{name}:{no}: links to {target}: {page} has no heading with that anchor")
        for path, reg in REGISTRY_ROW.findall(line):
            entries = registry(path, reg) if (ROOT / path).is_file() else None
            if entries is None:
                problems.append(f"{name}:{no}: `{path}` has no registry `{reg}`")
                continue
            cells = line.split("|")
            listed = re.findall(r"`([\w\-]+)`", cells[-2] if len(cells) > 2 else "")
            problems += [f"{name}:{no}: `{reg}` in `{path}` has no entry `{e}`" for e in listed
                         if e not in entries]
    return problems


# ------------------------------------------------------------------------ the tests

def read_pages() -> dict[str, str]:
    return {p: (ROOT / p).read_text() for p in PAGES}


@pytest.mark.parametrize("page", PAGES)
def test_page_names_real_commands_keys_and_files(page):
    problems = check_page(page, read_pages()[page], read_pages())
    assert not problems, "stale documentation:\n" + "\n".join(problems)


def test_docs_pages_exist_and_the_readme_links_each():
    readme = (ROOT / "README.md").read_text()
    missing = [p for p in EXPECTED_DOCS if not (DOCS / p).is_file()]
    assert not missing, f"docs/ lacks {missing}"
    unlinked = [p for p in sorted(DOCS.glob("*.md")) if f"(docs/{p.name}" not in readme]
    assert not unlinked, f"README.md links to no {', '.join(p.name for p in unlinked)}"


def test_readme_stays_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, (f"README.md has {lines} lines (at most {README_MAX_LINES}): "
                                       f"move the detail to a page in docs/")


@pytest.mark.parametrize("page", METHOD_PAGES)
def test_method_page_opens_with_its_map(page):
    """A method page's first section is its map, naming registry entries that exist."""
    text = (DOCS / page).read_text()
    first = re.search(r"^## (.*)$", text, flags=re.M)
    assert first and first.group(1).strip().lower() == "map", f"docs/{page}: the first section must be '## Map'"
    section = text[first.end():].split("\n## ", 1)[0]
    assert REGISTRY_ROW.search(section), f"docs/{page}: the map names no registry (`file.py` `NAME`)"


# ------------------------------------------------------------------------ the checker can fail

FAKE_PAGE = """# A page

A path that is gone: `ar/order.py`, a link that is gone: [flow](flow-matching.md), a key
that is gone: `model.ordr=cell`, `ordr=cell`, a class that is gone: `TextEmbedder`.

| part | registry | entries |
| --- | --- | --- |
| order | `ar/orders.py` `ORDERS` | `raster`, `spiral` |

```bash
python train_gen.py --config configs/quickstart.yaml model.ordr=cell out_dir=runs/x
python sample.py --config configs/sample/nope.yaml weights=RUN/weights/ema.safetensors out=x.png
python -m tokenizer.encode data.root=data/x tokenizer=WEIGHTS out=data/c num_workrs=0
python sample.py weights=RUN/weights/ema.safetensors out=x.png sampling.cfg_schedule=spiral
python -m tokenizer.nope out=x
python bench/nope.py size=AR-B
make quickstart-nope
frobnicate --all
torchrun --nproc_per_node=8 sample.py weights=RUN/weights/ema.safetensors sampler=fast
python reproduce.py --config configs/reproduce/llamagen-XL.yaml ckpt=PATH nproc=N \\
    sampler=sjd|coupled|gsd
```
"""


def test_checker_reports_each_kind_of_stale_statement():
    """A synthetic page with one mistake of every kind: each is reported with its line."""
    problems = "\n".join(check_page("docs/fake.md", FAKE_PAGE))
    expected = [
        (3, "`ar/order.py`, which is not in the repository"),
        (3, "flow-matching.md, which does not exist"),
        (4, "'model.ordr' is no key"),
        (4, "no class or name `TextEmbedder`"),
        (8, "`ORDERS` in `ar/orders.py` has no entry `spiral`"),
        (11, "`train_gen.py` has no key 'model.ordr' (did you mean model.order"),
        (12, "--config configs/sample/nope.yaml: no such file"),
        (13, "`tokenizer.encode` has no key 'num_workrs'"),
        (14, "sampling.cfg_schedule='spiral' is out of range"),
        (15, "-m tokenizer.nope: no such module"),
        (16, "bench/nope.py: no such script"),
        (17, "make quickstart-nope: no such target"),
        (18, "runs `frobnicate`"),
        (19, "sampler='fast' is out of range"),
    ]
    for line, what in expected:
        hits = [p for p in problems.splitlines() if p.startswith(f"docs/fake.md:{line}:") and what in p]
        assert hits, f"not reported at line {line}: {what}\n{problems}"
    # the placeholders of a correct command (PATH, N, alternatives) are not reported
    assert "docs/fake.md:20:" not in problems, problems


def test_checker_reports_a_stale_layout():
    """A layout that names a file that is gone, leaves one out, or forgets a folder."""
    page = """# R

## Layout

```
common/      config.py, dist.py, precision.py, gone.py, nowhere/ (a folder)
train_gen.py sample.py
```
"""
    problems = "\n".join(check_page("README.md", page))
    for what in ("names common/...gone.py, which is not in common/", "leaves out common/io.py",
                 "names common/nowhere/, which does not exist",
                 "leaves out ar", "leaves out eval_fid.py"):
        assert what in problems, f"not reported: {what}\n{problems}"


def test_checker_reports_keys_the_schema_has_moved():
    """A key the schema still reads but has moved (a deprecation note) is reported too."""
    import common.config

    if not hasattr(common.config, "upgrade_legacy"):
        pytest.skip("this version of common/config.py moves no keys")
    page = "```bash\npython train_gen.py --config configs/quickstart.yaml model.cell=2\n```\n"
    problems = check_page("docs/fake.md", page)
    assert any(p.startswith("docs/fake.md:2:") and "an old key" in p for p in problems), problems


def test_checker_passes_a_correct_page():
    page = """# Fine

`ar/orders.py`, `configs/imagenet256/AR-{B,L,XL}.yaml`, `tests/test_*_faults.py`,
`runs/quickstart/grid.png`, `sampling.cfg_scale=2`, `cfg_scale=2`, [the pipeline](pipeline.md#map),
`ARModel.extend`, `model.extend`, `AutoencoderKL`.

```bash
make quickstart   # a comment
python train_gen.py --config configs/quickstart.yaml train.max_steps=10 out_dir=runs/x
torchrun --nproc_per_node=8 -m tokenizer.encode ...
python -m convert.llamagen gpt pretrained_models/c2i_XL_384.pt image_size=384 out=weights/x.safetensors
python bench/sample_speed.py size=AR-B batch_sizes=[1,64] grid=16
```
"""
    pages = {"docs/pipeline.md": "# P\n\n## Map\n"}
    assert check_page("docs/fine.md", page, pages) == []
