"""Writes the file system refuses: only ENOSPC/EDQUOT is a full disk; a refused write (a
read-only mount, /proc, no permission) is named by the path the user asked for, never by our
hidden temporary file, and never called a full disk."""

import errno
import subprocess
import sys

import pytest

from common.io import (DiskFullError, WriteRefusedError, atomic_write_text, is_disk_full,
                       translate_disk_full)
from conftest import FIXTURES, ROOT, make_code_cache
from faults import mounted_tmpfs
from test_train import train_cmd


@pytest.fixture
def read_only(tmp_path):
    """A read-only tmpfs of 1 MiB: little free space, and every write refused with EROFS."""
    yield from mounted_tmpfs(tmp_path / "ro", "ro,size=1m", "a read-only tmpfs")


def test_only_enospc_and_edquot_are_a_full_disk_whatever_the_free_space(monkeypatch, tmp_path):
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 20, 1 << 20, 0))
    for code in (errno.EROFS, errno.EACCES, errno.ENOENT):
        assert not is_disk_full(OSError(code, "refused"), tmp_path)
    for code in (errno.ENOSPC, errno.EDQUOT):
        assert is_disk_full(OSError(code, "full"), tmp_path)
    # torch.save reports a full disk as a RuntimeError: that one still goes by the free space
    assert is_disk_full(RuntimeError("unexpected pos"), tmp_path)


def test_a_write_into_proc_names_the_path_asked_for():
    with pytest.raises(WriteRefusedError) as e:
        atomic_write_text("/proc/x.safetensors", "weights")
    message = str(e.value)
    assert message.startswith("cannot write /proc/x.safetensors (") and ".tmp" not in message
    assert "no space" not in message


def test_an_input_missing_while_writing_keeps_its_own_error(tmp_path):
    """Reading an input inside a write (pack_npz reads shards) is not a refused write."""
    with pytest.raises(FileNotFoundError) as e, translate_disk_full(tmp_path / "out.npz"):
        open(tmp_path / "shard_00000" / "0.png", "rb")
    assert not isinstance(e.value, (WriteRefusedError, DiskFullError))


def one_error_line(proc) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="needs ../shared/fixtures/llamagen")
def test_converting_into_proc_is_not_called_a_full_disk():
    proc = subprocess.run([sys.executable, "-m", "convert.llamagen", "vq",
                           str(FIXTURES / "llamagen_vq_tiny.pt"), "out=/proc/x.safetensors"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = one_error_line(proc)
    assert "cannot write /proc/x.safetensors" in line and "no space" not in line
    assert ".tmp" not in line


def test_training_into_a_read_only_folder_names_it_and_not_a_full_disk(read_only, tmp_path):
    codes = make_code_cache(tmp_path / "codes", n=12)
    out = read_only / "run"
    proc = subprocess.run(train_cmd(out, codes, "train.max_steps=2"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    line = one_error_line(proc)
    assert f"cannot write {out}" in line and "no space" not in line and ".tmp" not in line


def test_a_checkpoint_clears_what_a_kill_mid_write_left(tmp_path):
    """A kill while LATEST or a checkpoint folder was being written leaves its temporary file;
    the next checkpoint of the resumed run removes them, so the run folder ends as an
    uninterrupted run's (found by the random kills of test_pipeline_faults)."""
    import torch

    from ar.checkpoint import save_resume
    from ar.ema import EMA
    from common.dist import init_distributed
    from conftest import tiny_model

    model = tiny_model()
    root = tmp_path / "checkpoints"
    root.mkdir()
    (root / ".LATEST.k1ll3d00.tmp").write_text("step_00")  # torn pointer
    (root / ".step_0000008.tmp").mkdir()  # a checkpoint folder never finished
    opt = torch.optim.AdamW(model.parameters())
    save_resume(tmp_path, 4, 32, model, opt, EMA(model, 0.9), init_distributed("cpu"), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step_0000004"]


def test_a_weights_export_clears_what_a_kill_mid_export_left(tmp_path):
    """The same for the step exports in weights/ (found by the random kills too)."""
    from ar.run_log import prune_weights

    (tmp_path / ".step_0000003.safetensors.mr61q6a6.tmp").write_bytes(b"torn")
    (tmp_path / "step_0000002.safetensors").write_bytes(b"w")
    (tmp_path / "step_0000004.safetensors").write_bytes(b"w")
    prune_weights(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004.safetensors"]
