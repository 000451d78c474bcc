"""Fault injection for `python -m tokenizer.encode`, run as a user runs it (a subprocess):
kill -9 at a random moment, re-run, compare with an uninterrupted run; corrupt images; input
errors end in one `error:` line without a traceback."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from faults import killed_midway
from tokenizer import save_tokenizer
from tokenizer.vq import VQConfig, VQModel

SHARD_SIZE, NUM_SHARDS = 4, 12


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    cfg = VQConfig(codebook_size=64, ch=32, ch_mult=[1, 2, 2], z_channels=8, num_res_blocks=1)
    return save_tokenizer(VQModel(cfg), cfg, tmp_path_factory.mktemp("tok") / "vq.safetensors")


def make_folder(root: Path, per_class: int) -> Path:
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / name / f"{i:02d}.png")
    return root


def command(data: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tokenizer.encode", f"data.root={data}", "data.resolution=32",
            f"tokenizer={weights}", f"out={out}", "batch_size=2", f"shard_size={SHARD_SIZE}",
            "num_workers=0", "device=cpu", *extra]


def encode(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def files(out: Path) -> dict[str, bytes]:
    """Every file of the folder, hidden ones (temp files) included."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def stamps(out: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir())}


def one_error_line(done: subprocess.CompletedProcess) -> str:
    """The failed command's message: exactly one `error:` line and no traceback anywhere."""
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


def test_kill_at_a_random_moment_then_rerun_gives_the_uninterrupted_cache(weights, tmp_path):
    data = make_folder(tmp_path / "data", per_class=SHARD_SIZE * NUM_SHARDS // 2)
    reference = tmp_path / "reference"
    encode(*command(data, weights, reference))

    seed = random.randrange(1 << 30)
    shards = random.Random(seed).randint(1, NUM_SHARDS - 3)
    out = killed_midway(tmp_path, seed, lambda out: command(data, weights, out),
                        lambda out: len(list(out.glob("codes_*.npy"))) >= shards,
                        lambda out: (out / "meta.json").exists(), 0.02)
    encode(*command(data, weights, out))
    assert files(out) == files(reference), f"kill seed {seed}"  # same names (no temp files) and bytes

    before = stamps(out)
    again = encode(*command(data, weights, out))
    assert f"already complete: {SHARD_SIZE * NUM_SHARDS} images in {NUM_SHARDS} shards; " \
           f"nothing to do" in again.stdout
    assert stamps(out) == before


def test_corrupt_image_error_then_skip_then_delete_and_rerun(weights, tmp_path):
    data = make_folder(tmp_path / "data", per_class=6)  # 12 images, shards of 4
    bad = data / "dog" / "01.png"  # item 7: the last of shard 1
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "codes"

    failed = encode(*command(data, weights, out, "num_workers=1"), check=False)
    line = one_error_line(failed)
    assert str(bad) in line and "delete it" in line and "skip_bad_images=true" in line
    shard0 = stamps(out)["codes_00000.npy"]  # finished before the bad file: kept
    assert not (out / "codes_00001.npy").exists() and not (out / "meta.json").exists()

    encode(*command(data, weights, out, "skip_bad_images=true"))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"] == ["dog/01.png"] and meta["count"] == 11
    assert [s["count"] for s in meta["shards"]] == [4, 3, 4]
    assert stamps(out)["codes_00000.npy"] == shard0

    bad.unlink()
    encode(*command(data, weights, out))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["skipped"] == [] and meta["count"] == 11
    assert [s["count"] for s in meta["shards"]] == [4, 4, 3]
    assert stamps(out)["codes_00000.npy"] == shard0
    fresh = tmp_path / "fresh"
    encode(*command(data, weights, fresh))
    assert files(out) == files(fresh)


def test_input_errors_are_one_line(weights, tmp_path):
    data = make_folder(tmp_path / "data", per_class=2)
    line = one_error_line(encode(*command(data, weights, tmp_path / "c", "shard_size=0"),
                                 check=False))
    assert "shard_size=0 is out of range: it must be >= 1" in line
    not_weights = tmp_path / "vq.safetensors"
    not_weights.write_bytes(b"garbage")
    line = one_error_line(encode(*command(data, not_weights, tmp_path / "c"), check=False))
    assert str(not_weights) in line
    line = one_error_line(encode(sys.executable, "-m", "dataset.shapes", f"out={tmp_path / 's'}",
                                 "resolution=8", check=False))
    assert "resolution" in line and "32 to 256" in line
