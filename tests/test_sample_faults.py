"""Fault injection on sample.py: kill -9 after a finished shard, re-runs, a tokenizer that does
not fit, bad settings, class ids and prompts the generator cannot take, prompt files that are
not text. Nothing finished is lost or rewritten; every error is one line."""

import logging
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import sample
from common.config import run_cli
from conftest import ROOT
from sampling.run import SampleRunConfig
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


# ------------------------------------------------------------------------- bad conditions and inputs

def cli_error(*args) -> str:
    """sample.py's one-line error for these arguments, run in-process as `run_cli` runs it."""
    with pytest.raises(SystemExit) as stop:
        run_cli(sample.main, SampleRunConfig, argv=["device=cpu", *map(str, args)])
    line = str(stop.value.code)
    assert line.startswith("error: ") and "\n" not in line and "Traceback" not in line, line
    return line


@pytest.fixture(scope="module")
def text_weights(weights):  # noqa: F811
    """A random text-to-image generator (byte captions of at most 6 tokens) over the same VQ."""
    from ar.checkpoint import export_generator
    from ar.model import ARModel
    from common.io import sha256_file
    from conftest import tiny_text_spec

    vq = weights.parent / "vq.safetensors"
    spec = tiny_text_spec(grid=4, text_vocab=257, max_tokens=6, vocab=32)
    spec.tokenizer_path, spec.tokenizer_sha256 = str(vq), sha256_file(vq)
    torch.manual_seed(0)
    return export_generator(weights.parent / "text_gen.safetensors", ARModel(spec))


@pytest.mark.parametrize("classes, shown, bad", [("[3]", "[3]", 3), ("[0,7]", "[0, 7]", 7)])
def test_class_ids_the_model_lacks_are_one_line_errors(weights, tmp_path, classes, shown, bad):  # noqa: F811
    line = cli_error(f"weights={weights}", f"out={tmp_path / 'g.png'}", f"classes={classes}")
    assert f"classes={shown}: no class {bad}" in line and "3 classes" in line and "ids 0-2" in line
    assert "(0 c0, 1 c1, 2 c2)" in line  # the names the weights carry
    assert not (tmp_path / "g.png").exists()
    # images mode draws every class: classes= there would be ignored, so it is refused
    line = cli_error(f"weights={weights}", f"out={tmp_path / 's'}", "mode=images", f"classes={classes}")
    assert "classes=" in line and "mode=images" in line and "labels=" in line


def test_class_ids_of_a_converted_model_without_names(tmp_path):
    from test_speculative import small_model

    model = small_model(3, 2, 2)
    model.spec.class_names = ["class 0", "class 1"]  # a converter's placeholders
    with pytest.raises(ValueError, match=r"classes=\[2\]: no class 2; .* 2 classes \(the weights "
                                         r"carry no class names.*\): pass ids 0-1"):
        model.cond.grid_rows([2], None, "cpu")


def test_classes_and_prompts_together_are_an_error(weights, text_weights, tmp_path):  # noqa: F811
    for model in (weights, text_weights):
        line = cli_error(f"weights={model}", f"out={tmp_path / 'g.png'}", "classes=[0]", "prompt=a red star")
        assert "classes=[0]" in line and "prompt=" in line
    line = cli_error(f"weights={text_weights}", f"out={tmp_path / 'g.png'}", "classes=[0]")
    assert "classes=[0]" in line and "text-to-image" in line and "prompt=" in line
    line = cli_error(f"weights={weights}", f"out={tmp_path / 'g.png'}", "prompt=a red star")
    assert "prompt" in line and "class-conditional" in line and "classes=" in line


def test_prompt_files_that_are_not_text_name_the_file(text_weights, tmp_path):
    binary = tmp_path / "prompts.png"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    line = cli_error(f"weights={text_weights}", f"out={tmp_path / 'g.png'}", f"prompts={binary}")
    assert str(binary) in line and "not UTF-8 text" in line and "one prompt a line" in line


def test_a_prompts_folder_says_which_file_to_pass(text_weights, tmp_path):
    folder = tmp_path / "heldout"
    folder.mkdir()
    (folder / "captions.jsonl").write_text('{"caption": "a red star"}\n')
    line = cli_error(f"weights={text_weights}", f"out={tmp_path / 'g.png'}", f"prompts={folder}")
    assert f"prompts={folder} is a folder" in line and str(folder / "captions.jsonl") in line


def test_prompts_are_quoted_as_written(text_weights, tmp_path):
    line = cli_error(f"weights={text_weights}", f"out={tmp_path / 'g.png'}", "prompt=une étoile très rouge")
    assert '"une étoile très rouge" is' in line and "\\u" not in line


def test_the_empty_prompt_samples_unconditionally_and_says_so(text_weights, tmp_path):
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("sample").addHandler(handler)
    try:  # prompt='""' in a shell (there, prompt="" is prompt=: no prompt at all)
        run_cli(sample.main, SampleRunConfig, argv=["device=cpu", f"weights={text_weights}", "prompt=\"\"",
                                                      f"out={tmp_path / 'g.png'}", "per_class=1"])
    finally:
        logging.getLogger("sample").removeHandler(handler)
    assert (tmp_path / "g.png").is_file()
    assert any('prompt "" is the empty caption' in s and "unconditional" in s for s in said), said


def test_next_scale_tokenizer_of_another_schedule_does_not_fit(tmp_path):
    from ar.checkpoint import export_generator
    from common.io import sha256_file
    from test_next_scale import tiny_msvq, tiny_scale_model
    from tokenizer.msvq import MSVQConfig, MSVQModel

    msvq = tiny_msvq(tmp_path)  # scales [1, 2, 4], 8-px images
    model = tiny_scale_model()
    model.spec.tokenizer_path, model.spec.tokenizer_sha256 = str(msvq), sha256_file(msvq)
    gen = export_generator(tmp_path / "gen.safetensors", model)
    cfg = MSVQConfig(codebook_size=16, codebook_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                     patch_nums=[1, 2, 3])
    other = save_tokenizer(MSVQModel(cfg), cfg, tmp_path / "other.safetensors")
    line = cli_error(f"weights={gen}", f"tokenizer={other}", f"out={tmp_path / 'g.png'}")
    assert f"tokenizer {other} does not fit generator {gen}" in line
    assert "scale schedule [1, 2, 3] vs the generator's [1, 2, 4]" in line and "px images" not in line
