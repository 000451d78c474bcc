"""Fault injection on sample.py: kill -9 after a finished shard, re-runs, a tokenizer that does
not fit, bad settings. Nothing finished is lost or rewritten."""

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT
from test_sample import BASE, run_sample, weights  # noqa: F401  (the module-scoped fixture)
from test_train_faults import snapshot
from tokenizer import build_tokenizer, save_tokenizer
from tokenizer.vq import VQConfig

IMAGES = ["mode=images", "num_images=48"]  # 12 shards of 4


def one_error_line(proc):
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


def test_killed_after_a_finished_shard_then_resumed_gives_the_same_images(weights, tmp_path):  # noqa: F811
    full = tmp_path / "full"
    run_sample(weights, f"out={full}", *IMAGES)
    out, rng = tmp_path / "killed", random.Random()
    cmd = [sys.executable, str(ROOT / "sample.py"), f"weights={weights}", *BASE, f"out={out}", *IMAGES]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first, deadline = out / "shard_00000" / "labels.json", time.time() + 300
    while time.time() < deadline and proc.poll() is None and not first.is_file():
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.05))  # mid-batch or mid-shard-write
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "sampling ended before the kill"
    assert first.is_file() and not (out / "samples.npz").exists()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "shard_00000").iterdir()}
    run_sample(weights, f"out={out}", *IMAGES)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shard_00000").iterdir()} == kept
    a, b = np.load(full / "samples.npz"), np.load(out / "samples.npz")
    assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    assert not list(out.glob(".*.tmp"))  # the shard the kill tore was cleaned up on the re-run


def test_rerunning_finished_sampling_changes_nothing_and_says_so(weights, tmp_path):  # noqa: F811
    out = tmp_path / "s"
    run_sample(weights, f"out={out}", "mode=images", "num_images=8")
    grid = tmp_path / "grid.png"
    run_sample(weights, f"out={grid}", "mode=grid", "per_class=2")
    before, grid_before = snapshot(out), (grid.read_bytes(), grid.stat().st_mtime_ns)
    proc = run_sample(weights, f"out={out}", "mode=images", "num_images=8")
    assert "already holds all 8 images; nothing to do" in proc.stdout + proc.stderr
    proc = run_sample(weights, f"out={grid}", "mode=grid", "per_class=2")
    assert "kept (the same grid, byte for byte)" in proc.stdout + proc.stderr
    assert snapshot(out) == before and (grid.read_bytes(), grid.stat().st_mtime_ns) == grid_before


@pytest.mark.parametrize("codebook, ch_mult", [(64, [1, 1, 2]), (32, [1, 2])])
def test_tokenizer_of_another_codebook_or_grid_is_an_error(weights, tmp_path, codebook, ch_mult):  # noqa: F811
    cfg = VQConfig(codebook_size=codebook, codebook_dim=4, ch=32, ch_mult=ch_mult, num_res_blocks=1,
                   z_channels=8)
    torch.manual_seed(0)
    other = save_tokenizer(build_tokenizer(cfg), cfg, tmp_path / "other.safetensors")
    out = tmp_path / "grid.png"
    line = one_error_line(run_sample(weights, f"out={out}", f"tokenizer={other}", check=False))
    assert str(other) in line and "does not fit generator" in line
    assert ("codebook 64 codes" in line) if codebook == 64 else ("8x8 codes per 16-px image" in line)
    assert not out.exists()


@pytest.mark.parametrize("arg, key", [("batch_size=0", "batch_size=0"),
                                      ("sampling.top_p=1.5", "sampling.top_p=1.5"),
                                      ("tokenizer=/nowhere/vq.safetensors", "tokenizer=/nowhere")])
def test_bad_settings_are_one_line_errors(weights, tmp_path, arg, key):  # noqa: F811
    line = one_error_line(run_sample(weights, f"out={tmp_path / 'g.png'}", arg, check=False))
    assert key in line
