"""Fault injection on train_gen.py: kill -9 after real work, re-runs, other data, torn logs,
bad settings and a full disk. Each must lose nothing and leave existing outputs intact."""

import json
import random
import shutil
import subprocess

import pytest

from conftest import make_code_cache
from faults import KILLED, assert_same_weights, kill_when, latest_step, mounted_tmpfs, snapshot
from test_train import ROOT, run_train, train_cmd

STEPS = ["train.max_steps=40", "train.ckpt_every=6", "train.log_every=4", "train.keep_ckpts=2",
         "model.resid_dropout=0.1"]  # ckpt_every not a multiple of log_every; dropout: RNG matters


def run_fails(out, codes, *overrides):
    proc = subprocess.run(train_cmd(out, codes, *overrides), cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    return make_code_cache(tmp_path_factory.mktemp("codes") / "cache", n=48)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, codes):
    """An uninterrupted run: its metrics and exported weights are what every faulted run must end with."""
    out = tmp_path_factory.mktemp("ref") / "run"
    return out, run_train(out, codes, *STEPS)


def kill_after_checkpoint(out, codes, min_step, rng):
    """Start training and kill -9 it at a random moment after checkpoint `min_step` exists."""
    status = kill_when(train_cmd(out, codes, *STEPS), lambda: latest_step(out) >= min_step, rng,
                       0.1)  # anywhere after it: mid-step, mid-log or mid-checkpoint
    assert status == KILLED, f"the run ended before the kill (exit status {status})"
    assert latest_step(out) >= min_step, "no checkpoint before the kill"


def test_killed_twice_then_resumed_gives_the_uninterrupted_run_exactly(tmp_path, codes, reference):
    ref_dir, ref_metrics = reference
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    out = tmp_path / "run"
    kill_after_checkpoint(out, codes, 6, rng)
    kill_after_checkpoint(out, codes, 18, rng)
    with open(out / "metrics.jsonl", "a") as f:  # and a log line torn by the kill
        f.write('{"step": 99, "loss": 1.2')
    resumed = run_train(out, codes, *STEPS)
    assert resumed == [dict(m, samples_per_s=r["samples_per_s"], tokens_per_s=r["tokens_per_s"])
                       for m, r in zip(ref_metrics, resumed)], f"kill seed {seed}"
    assert [m["step"] for m in resumed] == list(range(4, 41, 4))
    for name in ("ema.safetensors", "step_0000036.safetensors"):
        assert_same_weights(out / "weights" / name, ref_dir / "weights" / name)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["final"]["loss"] == ref_metrics[-1]["loss"]


def test_rerunning_a_finished_run_changes_nothing_and_says_so(tmp_path, codes, reference):
    ref_dir, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_dir, out)
    before = snapshot(out)
    proc = subprocess.run(train_cmd(out, codes, *STEPS), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = proc.stdout + proc.stderr
    assert "already finished at step 40" in said and "nothing to do" in said
    assert snapshot(out) == before


def test_resuming_with_other_data_or_settings_is_refused_listing_each_difference(tmp_path, codes,
                                                                                  reference):
    ref_dir, _ = reference
    out = tmp_path / "run"
    shutil.copytree(ref_dir, out)
    before = snapshot(out)
    other = make_code_cache(tmp_path / "other", n=30, vocab=64, tokenizer_sha="f" * 64)
    line = run_fails(out, other, *STEPS, "train.max_steps=50")
    for diff in ("data.codebook_size: checkpoint 32, now 64", "data.count: checkpoint 48, now 30",
                 "data.tokenizer_sha256"):
        assert diff in line
    assert "another out_dir=" in line
    line = run_fails(out, codes, *STEPS, "train.max_steps=50", "train.lr=0.1")
    assert "train.lr: checkpoint 0.003, now 0.1" in line
    assert snapshot(out) == before  # nothing touched by the refused runs


@pytest.mark.parametrize("override, key", [("train.ckpt_every=0", "train.ckpt_every=0"),
                                           ("train.log_every=0", "train.log_every=0"),
                                           ("train.cond_dropout=1.5", "train.cond_dropout=1.5"),
                                           ("model.token_dropout=-0.1", "model.token_dropout=-0.1"),
                                           ("sampling.top_p=0", None)])
def test_out_of_range_settings_are_named_at_load(tmp_path, codes, override, key):
    if key is None:  # a nested sampling config: the grid's
        override, key = "grid.sampling.top_p=0", "sampling.top_p=0"
    line = run_fails(tmp_path / "run", codes, override)
    assert key in line and "out of range" in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_missing_code_cache_is_named_by_key(tmp_path):
    line = run_fails(tmp_path / "run", tmp_path / "nowhere")
    assert "data.codes=" in line and "nowhere" in line and "tokenizer.encode" in line


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB file system (tmpfs): room for one checkpoint with its exported weights, not two."""
    yield from mounted_tmpfs(tmp_path / "disk", "size=4m", "a small tmpfs")


def test_full_disk_is_reported_cleanly_and_the_run_resumes_after_space_is_freed(small_disk, codes,
                                                                                 reference):
    ref_dir, ref_metrics = reference
    out = small_disk / "run"
    line = run_fails(out, codes, *STEPS)
    assert line.startswith("error: no space left while writing ")
    assert "free space and run the same command again; the last complete checkpoint is step 6" in line
    assert (out / "checkpoints" / "LATEST").read_text().strip() == "step_0000006"
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = run_train(out, codes, *STEPS)
    assert [m["loss"] for m in resumed] == [m["loss"] for m in ref_metrics]
    assert_same_weights(out / "weights" / "ema.safetensors", ref_dir / "weights" / "ema.safetensors")
