"""train_gen.py end to end on a tiny code cache: resume, DDP equivalence, DeepSpeed, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ar.checkpoint import export_generator, load_generator
from ar.conditioning import ClassCondition
from ar.model import ARModel
from common.io import load_state_strict, read_weights
from conftest import ROOT, make_code_cache, tiny_model, tiny_spec

BASE = ["model.size=debug", "model.token_dropout=0", "model.resid_dropout=0", "model.ffn_dropout=0",
        "train.global_batch=8", "train.lr=3e-3", "train.log_every=1", "train.ema_decay=0.9",
        "train.device=cpu", "train.threads=1", "train.precision=fp32"]  # fp32: exact comparisons


def train_cmd(out, codes, *overrides, nproc=1):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + [str(ROOT / "train_gen.py"), f"out_dir={out}", f"data.codes={codes}", *BASE, *overrides]


def run_train(out, codes, *overrides, nproc=1):
    proc = subprocess.run(train_cmd(out, codes, *overrides, nproc=nproc), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def codes(tmp_path_factory):
    return make_code_cache(tmp_path_factory.mktemp("codes") / "cache", n=48)


def test_kill_and_resume_continues_the_same_loss_trajectory(tmp_path, codes):
    steps = ["train.max_steps=14", "train.ckpt_every=4", "model.resid_dropout=0.1"]  # dropout: RNG state matters
    ref = run_train(tmp_path / "ref", codes, *steps)
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(out, codes, *steps), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "LATEST"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.is_file() and "step_0000008" in latest.read_text()):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid-training, without any chance to clean up
    proc.wait()
    assert latest.is_file(), "no checkpoint appeared before the kill"
    resumed = run_train(out, codes, *steps)
    assert [m["step"] for m in resumed] == list(range(1, 15))
    for a, b in zip(ref, resumed):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), (a, b)
    assert ref[-1]["loss"] < 0.8 * ref[0]["loss"]  # and it did learn
    w_ref, _, _ = read_weights(tmp_path / "ref" / "weights" / "ema.safetensors", "generator")
    w_res, _, _ = read_weights(out / "weights" / "ema.safetensors", "generator")
    assert all(torch.allclose(w_ref[k], w_res[k], atol=1e-6) for k in w_ref)


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, codes):
    one = run_train(tmp_path / "one", codes, "train.max_steps=6", "train.ckpt_every=100")
    two = run_train(tmp_path / "two", codes, "train.max_steps=6", "train.ckpt_every=100", nproc=2)
    accum = run_train(tmp_path / "accum", codes, "train.max_steps=6", "train.ckpt_every=100",
                      "train.micro_batch=2", nproc=2)  # 2 processes x 2 micro-batches x 2 images
    for a, b, c in zip(one, two, accum):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["loss"] == pytest.approx(c["loss"], abs=1e-5)


def test_deepspeed_zero_trains_and_resumes_on_cpu(tmp_path, codes):
    pytest.importorskip("deepspeed")
    args = ["train.engine=deepspeed", "train.zero_stage=2", "train.max_steps=6", "train.ckpt_every=3"]
    ddp = run_train(tmp_path / "ddp", codes, "train.max_steps=6", "train.ckpt_every=100", nproc=2)
    ds = run_train(tmp_path / "ds", codes, *args, nproc=2)
    for a, b in zip(ddp, ds):  # same optimiser, same data: the same trajectory
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    # resume: drop the final checkpoint and weights, re-run, get the same end point
    import shutil
    shutil.rmtree(tmp_path / "ds" / "checkpoints" / "step_0000006")
    (tmp_path / "ds" / "checkpoints" / "LATEST").write_text("step_0000003\n")
    again = run_train(tmp_path / "ds", codes, *args, nproc=2)
    assert again[-1]["loss"] == pytest.approx(ds[-1]["loss"], rel=1e-5)


def test_changed_model_size_on_resume_is_a_clear_error(tmp_path, codes):
    run_train(tmp_path / "run", codes, "train.max_steps=2", "train.ckpt_every=2")
    proc = subprocess.run(train_cmd(tmp_path / "run", codes, "train.max_steps=4", "model.dim=128"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "model.dim: checkpoint None, now 128" in proc.stderr and "another out_dir=" in proc.stderr


def test_config_typo_and_missing_data_are_clear_errors(tmp_path):
    proc = subprocess.run(train_cmd(tmp_path / "r", tmp_path / "none", "train.lrr=1"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "train.lrr" in proc.stderr and "train.lr" in proc.stderr
    proc = subprocess.run(train_cmd(tmp_path / "r", tmp_path / "no_such_cache"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no_such_cache" in proc.stderr


def test_weights_round_trip_strictly(tmp_path):
    model = tiny_model()
    path = export_generator(tmp_path / "w.safetensors", model)
    loaded = load_generator(path)
    x, cond = torch.randint(0, 32, (2, 16)), ClassCondition(torch.tensor([0, 1]))
    assert torch.equal(model.hidden(x, cond), loaded.hidden(x, cond))
    assert (tmp_path / "w.yaml").is_file()  # the human-readable config beside it
    tensors, _, _ = read_weights(path, "generator")
    other = ARModel(tiny_spec(dim=128))
    with pytest.raises(ValueError, match="different model size"):
        load_state_strict(other, tensors, "w.safetensors")
    del tensors["head.output.weight"]
    with pytest.raises(ValueError, match="missing keys.*head.output.weight"):
        load_state_strict(model, tensors, "w.safetensors")
    with pytest.raises(ValueError, match="expected argen 'tokenizer' weights"):
        read_weights(path, "tokenizer")


def test_grid_classes_the_model_lacks_are_refused_before_training(tmp_path):
    """The grid is drawn at the end of the run: a class id it lacks must not wait for it."""
    codes = make_code_cache(tmp_path / "codes", n=12, classes=3)
    proc = subprocess.run(train_cmd(tmp_path / "run", codes, "grid.classes=[0,3]"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert "grid.classes=[0, 3]: no class 3; this generator has 3 classes" in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()
