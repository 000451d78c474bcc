"""The code's shape, as DESIGN.md draws it: imports point down (entry scripts -> sampling -> ar
-> tokenizer -> dataset -> common; evaluation and convert never import sampling), no import
circle, files under 400 lines and functions at most 60 outside tests."""

import ast
import subprocess
from collections import defaultdict

from conftest import ROOT

LAYERS = {"common": 0, "dataset": 1, "tokenizer": 2, "ar": 3, "sampling": 4}
PACKAGES = (*LAYERS, "evaluation", "convert")


def _sources() -> list[str]:
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if (ROOT / f).is_file()]


def _imports() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (at any level of the file)."""
    files = {f[:-3].replace("/", ".").removesuffix(".__init__"): f for f in _sources()
             if f.split("/")[0] in PACKAGES}
    graph = defaultdict(set)
    for module, f in files.items():
        for node in ast.walk(ast.parse((ROOT / f).read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[module].update(n for n in names if n in files and n != module)
    return graph


def test_imports_point_down_and_never_run_in_a_circle():
    graph = _imports()
    up = [(a, b) for a, targets in graph.items() for b in targets
          if LAYERS.get(b.split(".")[0], -1) > LAYERS.get(a.split(".")[0], 9)
          or (a.split(".")[0] in ("evaluation", "convert") and b.startswith("sampling"))]
    assert not up, f"imports running up: {up}"
    circles = []

    def visit(module, path):
        for target in graph[module]:
            if target.startswith(module + "."):
                continue  # a package importing its own parts
            if target in path:
                circles.append(path[path.index(target):] + [target])
            elif len(path) < 12:
                visit(target, path + [target])

    for module in list(graph):
        visit(module, [module])
    assert not circles, f"import circles: {circles[:3]}"


def test_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for f in _sources():
        if f.startswith("tests/"):
            continue
        text = (ROOT / f).read_text()
        if len(text.splitlines()) >= 400:
            long_files.append(f)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{f}:{node.lineno} {node.name}")
    assert not long_files and not long_functions, (long_files, long_functions)
