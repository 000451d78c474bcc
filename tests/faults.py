"""Helpers of the fault-injection tests (tests/test_*_faults.py): run a command, kill -9 it
at a random moment after real work, run it in this process, and compare run folders."""

from __future__ import annotations

import importlib
import logging
import random
import runpy
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from common.io import read_weights
from conftest import ROOT

KILLED = -signal.SIGKILL  # the exit status of a process that kill -9 ended


def mounted_tmpfs(folder: Path, options: str, what: str):
    """Mount a tmpfs with `options` (e.g. "size=4m", "ro,size=1m") on FOLDER for a fixture to
    yield; skips the test where mounting is not allowed (needs root)."""
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount {what} here (needs root): {proc.stderr.strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=False)


def run(cmd: list) -> str:
    """Run a command to its end; what it said."""
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def run_in_process(cmd: list) -> str:
    """Run a command in this process as its `__main__` would (`python -m M ARGS` calls
    M.main(ARGS); a script runs as __main__): for re-runs that find their work done, which
    would spend most of their time (3-6 s each) importing in a fresh interpreter. What the
    commands' loggers said."""
    said, handler = [], logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("tokenizer.encode", "train", "sample")]
    args, threads, argv = [str(c) for c in cmd[1:]], torch.get_num_threads(), sys.argv
    for log in loggers:
        log.addHandler(handler)
    try:
        if args[0] == "-m":
            importlib.import_module(args[1]).main(args[2:])
        else:
            sys.argv = args
            runpy.run_path(args[0], run_name="__main__")
    finally:
        sys.argv = argv
        torch.set_num_threads(threads)  # train_gen.py sets train.threads
        for log in loggers:
            log.removeHandler(handler)
    return "\n".join(said)


def kill_when(cmd: list, ready: Callable[[], bool], rng: random.Random, within: float) -> int:
    """Start `cmd`, wait until `ready()` (real work is on disk), kill -9 it at a random moment up
    to `within` seconds later. Returns its exit status: KILLED if the kill found it running."""
    proc = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    try:
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0, within))  # mid-batch, mid-write or mid-checkpoint
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return proc.returncode


def killed_midway(tmp_path: Path, seed: int, cmd: Callable[[Path], list], ready: Callable[[Path], bool],
                  finished: Callable[[Path], bool], within: float) -> Path:
    """A folder where `cmd(out)` was killed -9 at a random moment after `ready(out)` held and
    before `finished(out)`: real work on disk and work left to do. A kill that comes after the
    work is done (a fast machine) tests nothing: then it is tried again in a fresh folder."""
    rng = random.Random(seed)
    for attempt in range(4):
        out = tmp_path / f"killed{attempt}"
        status = kill_when(cmd(out), lambda: ready(out), rng, within)
        if status == KILLED and ready(out) and not finished(out):
            return out
    pytest.fail(f"the run ended before the kill every time (last exit status {status}; "
                f"kill seed {seed})")


def latest_step(run_dir: Path) -> int:
    """The step of a training run's newest checkpoint; -1 before the first."""
    latest = run_dir / "checkpoints" / "LATEST"  # replaced atomically: never torn
    return int(latest.read_text().strip().split("_")[-1]) if latest.is_file() else -1


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, hidden ones (temp files) included."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def snapshot(folder):
    """{relative path: (bytes, mtime_ns)} of every file under `folder`."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def stamps(files) -> dict[str, int]:
    """{path: mtime_ns} of these files."""
    return {str(p): p.stat().st_mtime_ns for p in files}


def rerun_changes_nothing(reference: Path, out: Path, cmd: Callable[[Path], list]) -> str:
    """Run the command again on a copy of a finished output; no file may change. What it said."""
    shutil.copytree(reference, out)  # copy2: the mtimes come along
    before = snapshot(out)
    said = run_in_process(cmd(out))
    assert snapshot(out) == before
    return said


def assert_same_weights(a, b):
    """Bit-identical tensors and metadata; the run config may differ only in out_dir."""
    (ta, ca, ma), (tb, cb, mb) = read_weights(a, "generator"), read_weights(b, "generator")
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    strip = lambda meta: [line for line in meta.pop("run_config").splitlines()  # noqa: E731
                          if not line.startswith("out_dir:")]
    assert strip(ma) == strip(mb) and ma == mb and ca == cb
