"""tokenizer.encode: the code-cache format, resume, re-runs after the file list changed, bad
images, refusal of mixed settings, config range checks, read_meta."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ar.data import CodeCache
from conftest import make_image_folder
from dataset.folder import ClassFolderDataset
from tokenizer import load_tokenizer, save_tokenizer
from tokenizer.cache import read_meta
from tokenizer.encode import main
from tokenizer.vq import VQConfig, VQModel


@pytest.fixture
def folder(tmp_path) -> Path:
    """2 classes x 4 random 32x32 images (asymmetric, so flips give other codes)."""
    return make_image_folder(tmp_path / "data", 32)


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
    assert meta["source"] == str(folder.resolve()) and meta["skipped"] == []
    record = json.loads((out / "shard_00001.json").read_text())
    assert record["count"] == 3 and record["files"] == 3 and record["skipped"] == []

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


def snapshot(out: Path) -> dict:
    """Every file of a folder (hidden ones too): name -> (bytes, mtime)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.iterdir())}


def test_rerun_of_a_complete_cache_changes_no_file(folder, weights, tmp_path):
    out = tmp_path / "codes"
    meta = run(folder, weights, out)
    before = snapshot(out)
    assert run(folder, weights, out) == meta
    assert snapshot(out) == before


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


def test_leftovers_of_killed_writes_are_redone_and_removed(folder, weights, tmp_path):
    out = tmp_path / "codes"
    run(folder, weights, out)
    reference = {n: b for n, (b, _) in snapshot(out).items()}
    (out / "meta.json").unlink()
    (out / "codes_00001.npy").unlink()  # killed after its labels and record were rewritten
    (out / "labels_00002.npy").write_bytes(b"not an array")  # damaged by hand
    (out / "shard_00002.json").write_text("{")
    (out / ".codes_00002.npy.x1y2.tmp").write_bytes(b"half")  # a write killed before its rename
    (out / ".meta.json.z3.tmp").write_text("{")
    run(folder, weights, out)
    assert {n: b for n, (b, _) in snapshot(out).items()} == reference


def test_a_cache_of_the_previous_layout_is_completed_not_refused(folder, weights, tmp_path):
    out = tmp_path / "codes"
    meta = run(folder, weights, out)
    reference = {n: b for n, (b, _) in snapshot(out).items()}
    settings = json.loads((out / "encode_config.json").read_text())
    (out / "encode_config.json").write_text(json.dumps({**settings, "count": 8}))  # old key
    for record in out.glob("shard_*.json"):  # the old layout had no shard records
        record.unlink()
    assert run(folder, weights, out) == meta
    assert {n: b for n, (b, _) in snapshot(out).items()} == reference


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


def test_changed_file_list_redoes_only_the_shards_it_changes(folder, weights, tmp_path):
    out = tmp_path / "codes"
    run(folder, weights, out)  # shards: cat 0-2 | cat 3, dog 0-1 | dog 2-3
    kept = snapshot(out)
    (folder / "cat" / "3.png").unlink()
    (folder / "dog" / "3.png").unlink()
    meta = run(folder, weights, out)  # was refused before ("count: folder has 8, this run 6")
    after = snapshot(out)
    assert [s["count"] for s in meta["shards"]] == [3, 3] and meta["count"] == 6
    for name in ("codes_00000.npy", "labels_00000.npy", "shard_00000.json"):
        assert after[name] == kept[name]  # same bytes, not rewritten
    assert after["codes_00001.npy"] != kept["codes_00001.npy"]
    assert not any(n.endswith("00002.npy") or n == "shard_00002.json" for n in after)
    fresh = tmp_path / "fresh"
    assert run(folder, weights, fresh) == meta
    assert {n: b for n, (b, _) in snapshot(fresh).items()} == {n: b for n, (b, _) in after.items()}


def test_a_new_class_renumbers_labels_and_redoes_their_shards(folder, weights, tmp_path):
    out = tmp_path / "codes"
    run(folder, weights, out)
    (folder / "ant").mkdir()  # sorts first: every label moves up by one
    (folder / "cat" / "0.png").rename(folder / "ant" / "0.png")
    meta = run(folder, weights, out)
    assert meta["class_names"] == ["ant", "cat", "dog"] and meta["label_histogram"] == [1, 3, 4]
    _, labels = load_codes(out, meta)
    assert labels.tolist() == [0, 1, 1, 1, 2, 2, 2, 2]


def corrupt(path: Path) -> Path:
    path.write_bytes(b"not a png at all")
    return path


def test_a_bad_image_stops_the_run_naming_it(folder, weights, tmp_path):
    corrupt(folder / "dog" / "1.png")  # item 5, in shard 1
    out = tmp_path / "codes"
    with pytest.raises(SystemExit, match=r"dog/1\.png.*delete it.*skip_bad_images=true"):
        run(folder, weights, out)
    assert (out / "codes_00000.npy").is_file() and not (out / "meta.json").exists()
    with pytest.raises(SystemExit, match=r"dog/1\.png.*skip_bad_images=true"):  # from a worker too
        run(folder, weights, tmp_path / "codes_w", num_workers=1, shard_size=8)


def test_skip_bad_images_leaves_them_out_and_lists_them(folder, weights, tmp_path):
    lines = [json.dumps({"file": f"{c}/{i}.png", "caption": f"a {c} {i}"})
             for c in ("cat", "dog") for i in range(4)]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    corrupt(folder / "cat" / "1.png")
    corrupt(folder / "dog" / "2.png")
    out = tmp_path / "codes"
    meta = run(folder, weights, out, skip_bad_images="true")
    assert meta["skipped"] == ["cat/1.png", "dog/2.png"] and meta["count"] == 6
    assert [s["count"] for s in meta["shards"]] == [2, 3, 1] and meta["label_histogram"] == [3, 3]
    codes, labels = load_codes(out, meta)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert [r["caption"] for r in rows] == ["a cat 0", "a cat 2", "a cat 3", "a dog 0", "a dog 1",
                                            "a dog 3"]
    ds = ClassFolderDataset(folder, 32)
    good = [i for i, (p, _) in enumerate(ds.samples) if not p.endswith(("cat/1.png", "dog/2.png"))]
    x = torch.stack([ds[i][0] for i in good])
    np.testing.assert_array_equal(codes[:, 0], load_tokenizer(weights).encode(x).flatten(1).numpy())
    assert CodeCache(out).count == 6

    stamps = snapshot(out)
    assert run(folder, weights, out, skip_bad_images="true") == meta
    assert snapshot(out) == stamps  # complete: nothing redone
    with pytest.raises(SystemExit, match=r"cat/1\.png.*skip_bad_images=true"):
        run(folder, weights, out)  # without the option a skipped file is an error again
    assert snapshot(out) == stamps  # ... and the failed run changed nothing

    rng = np.random.default_rng(5)  # a good copy replaces a skipped file: its shard is redone
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / "cat" / "1.png")
    meta = run(folder, weights, out, skip_bad_images="true")
    assert meta["skipped"] == ["dog/2.png"] and meta["count"] == 7
    assert snapshot(out)["codes_00001.npy"] == stamps["codes_00001.npy"]


@pytest.mark.parametrize("override, message", [
    ("batch_size=0", "batch_size=0 is out of range: it must be >= 1"),
    ("shard_size=0", "shard_size=0 is out of range: it must be >= 1"),
    ("num_workers=-1", "num_workers=-1 is out of range: it must be >= 0"),
    ("data.resolution=0", "data.resolution=0 is out of range: it must be >= 1"),
    ("device=tpu", "device='tpu' is out of range: it must be one of auto, cpu, cuda"),
    ("data.root=NOWHERE", "data.root=.*nowhere not found.*dataset.shapes"),
    ("tokenizer=NOWHERE", "tokenizer=.*nowhere not found.*tokenizer.train"),
])
def test_config_range_checks_name_the_key(folder, weights, tmp_path, override, message):
    override = override.replace("NOWHERE", str(tmp_path / "nowhere"))
    key = override.split("=")[0]
    with pytest.raises(SystemExit, match=f"^error: config .*{message}") as e:
        run(folder, weights, tmp_path / "codes", **{key: override.split("=", 1)[1]})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "codes").exists()


def test_out_that_is_a_file_is_refused(folder, weights, tmp_path):
    (tmp_path / "codes").write_text("")
    with pytest.raises(SystemExit, match="out=.*codes is a file"):
        run(folder, weights, tmp_path / "codes")
