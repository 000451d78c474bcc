"""tokenizer.encode: the code-cache format, resume, refusal of mixed settings, read_meta."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.folder import ClassFolderDataset
from tokenizer import load_tokenizer, save_tokenizer
from tokenizer.encode import main, read_meta
from tokenizer.vq import VQConfig, VQModel


@pytest.fixture
def folder(tmp_path) -> Path:
    """2 classes x 4 random 32x32 images (asymmetric, so flips give other codes)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def weights(tmp_path) -> Path:
    torch.manual_seed(0)
    cfg = VQConfig(codebook_size=64, ch=32, ch_mult=[1, 2, 2], z_channels=8, num_res_blocks=1)
    return save_tokenizer(VQModel(cfg), cfg, tmp_path / "tok" / "vq.safetensors")


def run(folder, weights, out, **kw) -> dict:
    args = {"data.root": folder, "data.resolution": 32, "tokenizer": weights, "out": out,
            "batch_size": 3, "shard_size": 3, "num_workers": 0, **kw}
    return main([f"{k}={v}" for k, v in args.items()])


def load_codes(out: Path, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    codes = np.concatenate([np.load(out / s["codes"]) for s in meta["shards"]])
    labels = np.concatenate([np.load(out / s["labels"]) for s in meta["shards"]])
    return codes, labels


def test_encode_writes_the_cache_format(folder, weights, tmp_path):
    out = tmp_path / "codes"
    meta = run(folder, weights, out)
    assert meta == read_meta(out)
    assert meta["format"] == "argen-code-cache" and meta["version"] == 1 and meta["kind"] == "discrete"
    assert meta["tokenizer"]["name"] == "vq" and meta["tokenizer"]["path"] == str(weights.resolve())
    assert meta["tokenizer"]["config"]["codebook_size"] == 64
    assert len(meta["tokenizer"]["sha256"]) == 64
    assert meta["resolution"] == 32 and meta["grid"] == [8, 8] and meta["codebook_size"] == 64
    assert meta["variants"] == ["original", "hflip"] and meta["count"] == 8
    assert meta["num_classes"] == 2 and meta["class_names"] == ["cat", "dog"]
    assert meta["label_histogram"] == [4, 4] and meta["captions"] is None
    assert [s["count"] for s in meta["shards"]] == [3, 3, 2]
    assert meta["source"] == str(folder.resolve())

    codes, labels = load_codes(out, meta)
    assert codes.dtype == np.uint16 and codes.shape == (8, 2, 64)
    assert labels.dtype == np.int64 and labels.tolist() == [0] * 4 + [1] * 4
    ds = ClassFolderDataset(folder, 32)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    model = load_tokenizer(weights)
    np.testing.assert_array_equal(codes[:, 0], model.encode(x).flatten(1).numpy())
    np.testing.assert_array_equal(codes[:, 1], model.encode(x.flip(-1)).flatten(1).numpy())
    assert not np.array_equal(codes[:, 0], codes[:, 1])


def test_captions_are_copied(folder, weights, tmp_path):
    lines = [json.dumps({"file": f"{c}/{i}.png", "caption": f"a {c} {i}"})
             for c in ("cat", "dog") for i in range(4)]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "codes"
    meta = run(folder, weights, out)
    assert meta["captions"] == "captions.jsonl"
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert rows[5] == {"index": 5, "caption": "a dog 1"} and len(rows) == 8


def test_rerun_skips_finished_shards(folder, weights, tmp_path):
    out = tmp_path / "codes"
    run(folder, weights, out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    run(folder, weights, out)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")} == stamps


def test_half_finished_cache_resumes_identically(folder, weights, tmp_path):
    out = tmp_path / "codes"
    meta = run(folder, weights, out)
    before = load_codes(out, meta)
    (out / "meta.json").unlink()
    (out / "codes_00001.npy").unlink()
    with pytest.raises(ValueError, match="interrupted.*Re-run"):
        read_meta(out)
    kept = (out / "codes_00000.npy").stat().st_mtime_ns
    meta2 = run(folder, weights, out)
    assert meta2 == meta
    assert (out / "codes_00000.npy").stat().st_mtime_ns == kept
    after = load_codes(out, meta2)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])


def test_mismatched_settings_are_refused(folder, weights, tmp_path):
    out = tmp_path / "codes"
    run(folder, weights, out)
    with pytest.raises(SystemExit, match="different settings.*shard_size"):
        run(folder, weights, out, shard_size=4)
    torch.manual_seed(1)
    cfg = VQConfig(codebook_size=64, ch=32, ch_mult=[1, 2, 2], z_channels=8, num_res_blocks=1)
    other = save_tokenizer(VQModel(cfg), cfg, tmp_path / "other" / "vq.safetensors")
    with pytest.raises(SystemExit, match="tokenizer_sha256"):
        run(folder, other, out)


def test_read_meta_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*tokenizer.encode"):
        read_meta(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*not a code cache"):
        read_meta(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_meta(bad)
    (bad / "meta.json").write_text(json.dumps({"format": "something-else", "version": 1}))
    with pytest.raises(ValueError, match="expected format 'argen-code-cache'"):
        read_meta(bad)
    (bad / "meta.json").write_text(json.dumps({"format": "argen-code-cache", "version": 2}))
    with pytest.raises(ValueError, match="version 1"):
        read_meta(bad)
