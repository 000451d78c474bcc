"""dataset/: the shapes generator, class-folder reading, the ADM crop and pixel conversions."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.folder import ClassFolderDataset
from dataset.images import (ImageReadError, adm_center_crop, load_image, save_png, to_tensor,
                            to_uint8)
from dataset.shapes import (BACKGROUNDS, CLASSES, FILL_COLORS, LATTICE, MIN_COLOR_DISTANCE,
                            POSITIONS, SIZES, caption_for, draw, main, render, shape_attributes)


def _run_cli(out, *args):
    return main([f"out={out}", "progress=false", *args])


def _solid_png(path, color=(10, 200, 30), size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


# ----------------------------------------------------------------------------- shapes generator

def test_shapes_deterministic_from_seed():
    a, b = render(5, seed=0), render(5, seed=0)
    assert np.array_equal(a.image, b.image) and a.caption == b.caption
    other = [render(i, seed=1).image for i in range(8)]
    same = [render(i, seed=0).image for i in range(8)]
    assert not any(np.array_equal(x, y) for x, y in zip(same, other))


def test_splits_draw_from_separate_streams():
    # with jitter no two images coincide; without it, the splits are independent draws of the
    # same few thousand discrete images (their attribute sequences differ)
    train = [render(i, "train", jitter=True).image for i in range(16)]
    heldout = [render(i, "heldout", jitter=True).image for i in range(16)]
    assert not any(np.array_equal(t, h) for t in train for h in heldout)
    assert [shape_attributes(i, "train").caption for i in range(16)] != \
        [shape_attributes(i, "heldout").caption for i in range(16)]
    with pytest.raises(ValueError, match="split"):
        render(0, "validation")


def test_default_attributes_are_discrete_and_jitter_keeps_them():
    for i in range(300):
        a, j = shape_attributes(i), shape_attributes(i, jitter=True)
        assert a.radius == pytest.approx(sum(SIZES[a.size]) / 2)
        assert all(c * LATTICE == round(c * LATTICE) for c in a.center)
        assert (a.rotation_deg, a.gradient, a.fill_rgb) == (0.0, (0.0, 0.0), FILL_COLORS[a.color])
        # jitter varies inside each attribute, never the attribute (nor the caption)
        assert (j.class_name, j.size, j.color, j.background, j.position, j.caption) == \
            (a.class_name, a.size, a.color, a.background, a.position, a.caption)
        lo, hi = SIZES[j.size]
        assert lo <= j.radius <= hi and abs(j.rotation_deg) <= 15.0
    # equal attributes draw equal pixels: the same shape at the same place is the same image
    same = [(i, k) for i in range(200) for k in range(i) if shape_attributes(i).caption ==
            shape_attributes(k).caption]
    assert same and all(np.array_equal(render(i).image, render(k).image) for i, k in same[:5])


def test_labels_cycle_through_balanced_classes():
    samples = [shape_attributes(i) for i in range(80)]
    assert [s.label for s in samples] == [i % 8 for i in range(80)]
    assert all(s.class_name == CLASSES[s.label] for s in samples)
    assert np.bincount([s.label for s in samples]).tolist() == [10] * 8
    assert len(set(CLASSES)) == 8 and list(CLASSES) == sorted(CLASSES)


@pytest.mark.parametrize("resolution", [32, 64, 256])
def test_renders_at_supported_resolutions(resolution):
    s = render(3, resolution=resolution)
    assert s.image.shape == (resolution, resolution, 3) and s.image.dtype == np.uint8


@pytest.mark.parametrize("resolution", [31, 300, 0, 64.0])
def test_rejects_unsupported_resolutions(resolution):
    with pytest.raises(ValueError, match="32 to 256"):
        render(0, resolution=resolution)


def test_attributes_do_not_depend_on_resolution():
    a = render(11, resolution=32)
    b = render(11, resolution=64)
    assert a.caption == b.caption and a.center == b.center
    # 2x2 box-averaging the 64 px image gives the 32 px one up to edge anti-aliasing.
    down = b.image.astype(float).reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert np.abs(down - a.image).mean() < 2.0


def _one_per_class_size_position():
    seen = {}
    for i in range(4000):
        a = shape_attributes(i)
        seen.setdefault((a.class_name, a.size, a.position), a)
    assert len(seen) == len(CLASSES) * len(SIZES) * len(POSITIONS)
    return list(seen.values())


def test_every_class_draws_a_visible_shape_inside_the_image():
    jittered = [dataclasses.replace(shape_attributes(i, jitter=True), gradient=(0.0, 0.0))
                for i in range(64)]
    for attrs in jittered + _one_per_class_size_position():
        img = draw(attrs, 32).astype(int)
        bg = np.array(attrs.background_rgb)
        fg = np.abs(img - bg).sum(-1) > 30
        assert fg.mean() > 0.04, (attrs.caption, fg.mean())  # >= ~40 px even when small
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        assert (border == bg).all(), f"shape touches the border: {attrs.caption}"
        assert np.linalg.norm(np.subtract(attrs.fill_rgb, bg)) >= MIN_COLOR_DISTANCE - 20


def test_fill_colour_always_differs_from_background():
    for i in range(400):
        a = shape_attributes(i, "heldout", seed=3)
        named = np.linalg.norm(np.subtract(FILL_COLORS[a.color], BACKGROUNDS[a.background]))
        assert named >= MIN_COLOR_DISTANCE, a.caption


def test_captions_name_class_colour_size_and_position():
    seen = set()
    for i in range(200):
        a = shape_attributes(i)
        for word in (a.class_name, a.color, a.size, a.background):
            assert word in a.caption
        assert ("in the center" if a.position == "center" else a.position) in a.caption
        seen.update([a.size, a.position, a.color])
    assert set(SIZES) | set(POSITIONS) <= seen  # every named variation actually occurs
    assert caption_for("small", "red", "triangle", "top left", "grey") == \
        "a small red triangle at the top left on a grey background"
    assert "in the center" in caption_for("large", "blue", "ring", "center", "navy")


# ------------------------------------------------------------------- CLI + ClassFolderDataset

def test_cli_writes_a_tree_that_class_folder_dataset_reads_back(tmp_path):
    out = tmp_path / "shapes"
    summary = _run_cli(out, "num_train=16", "num_heldout=8", "seed=2")
    assert summary["written"] == 24
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["seed"] == 2 and meta["resolution"] == 32 and meta["classes"] == list(CLASSES)
    train = ClassFolderDataset(out / "train", 32)
    assert train.classes == list(CLASSES) and len(train) == 16
    for path, label in train.samples:
        i = int(os.path.basename(path)[:-4])
        ref = render(i, "train", 32, seed=2)
        assert label == ref.label
        assert train.captions[train.samples.index((path, label))] == ref.caption
    x, label = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(label, int)
    ref = render(int(os.path.basename(train.samples[0][0])[:-4]), seed=2)
    assert np.array_equal(to_uint8(x), ref.image)  # PNG + crop at the same size are lossless
    line = json.loads((out / "train" / "captions.jsonl").read_text().splitlines()[0])
    assert set(line) == {"file", "label", "class", "caption"}
    assert line["file"] == "circle/000000.png"
    assert len(ClassFolderDataset(out / "heldout", 32)) == 8


def test_cli_rerun_skips_existing_and_refuses_other_settings(tmp_path):
    out = tmp_path / "shapes"
    _run_cli(out, "num_train=8", "num_heldout=0")
    png = out / "train" / "circle" / "000000.png"
    stamp = png.stat().st_mtime_ns
    again = _run_cli(out, "num_train=16", "num_heldout=0")
    assert (again["written"], again["skipped"]) == (8, 8) and png.stat().st_mtime_ns == stamp
    assert len(ClassFolderDataset(out / "train", 32)) == 16
    shrunk = _run_cli(out, "num_train=8", "num_heldout=0")
    assert shrunk["written"] == 0 and len(ClassFolderDataset(out / "train", 32)) == 8
    with pytest.raises(SystemExit, match="choose another out"):
        _run_cli(out, "num_train=8", "num_heldout=0", "seed=1")
    with pytest.raises(SystemExit, match="choose another out"):
        _run_cli(out, "num_train=8", "num_heldout=0", "resolution=64")
    with pytest.raises(SystemExit, match="jitter"):
        _run_cli(out, "num_train=8", "num_heldout=0", "jitter=true")


def test_class_folder_finds_images_recursively_in_sorted_order(tmp_path):
    _solid_png(tmp_path / "b" / "z.PNG")
    _solid_png(tmp_path / "b" / "sub" / "a.png")
    _solid_png(tmp_path / "a" / "x.jpg")
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    ds = ClassFolderDataset(tmp_path, 16)
    assert ds.classes == ["a", "b"] and ds.captions is None
    assert [(os.path.relpath(p, tmp_path), y) for p, y in ds.samples] == [
        (os.path.join("a", "x.jpg"), 0), (os.path.join("b", "sub", "a.png"), 1),
        (os.path.join("b", "z.PNG"), 1)]
    assert ds[2][0].shape == (3, 16, 16)


def test_class_folder_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset.shapes"):
        ClassFolderDataset(tmp_path / "nope", 32)
    with pytest.raises(ValueError, match="no class sub-folders"):
        ClassFolderDataset(tmp_path, 32)
    (tmp_path / "cats").mkdir()
    with pytest.raises(ValueError, match="cats.*no images"):
        ClassFolderDataset(tmp_path, 32)


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    bad = tmp_path / "cls" / "broken.png"
    bad.parent.mkdir()
    bad.write_bytes(b"definitely not a png")
    ds = ClassFolderDataset(tmp_path, 32)
    with pytest.raises(ImageReadError, match="broken.png.*re-download"):
        ds[0]
    good = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(ImageReadError, match="cut.png"):
        load_image(cut, 32)


def test_caption_file_errors(tmp_path):
    _solid_png(tmp_path / "c" / "a.png")
    _solid_png(tmp_path / "c" / "b.png")
    caps = tmp_path / "captions.jsonl"
    caps.write_text(json.dumps({"file": "c/a.png", "caption": "x"}) + "\n")
    with pytest.raises(ValueError, match="no caption.*b.png"):
        ClassFolderDataset(tmp_path, 32)
    caps.write_text("".join(json.dumps({"file": f, "caption": "x"}) + "\n"
                            for f in ("c/a.png", "c/b.png", "c/gone.png")))
    with pytest.raises(ValueError, match="line 3.*gone.png"):
        ClassFolderDataset(tmp_path, 32)


# ---------------------------------------------------------------------------- image helpers

def test_adm_center_crop_keeps_the_centre_of_a_wide_image():
    pattern = np.random.default_rng(1).integers(0, 255, (32, 64, 3), np.uint8)  # 2:1, H=32
    out = adm_center_crop(Image.fromarray(pattern), 32)
    assert out.size == (32, 32)
    assert np.array_equal(np.asarray(out), pattern[:, 16:48])
    # 2x2 constant blocks make the BOX halving exact: 128x64 -> 64x32 -> centre 32x32.
    big = np.kron(pattern, np.ones((2, 2, 1), np.uint8))
    assert np.array_equal(np.asarray(adm_center_crop(Image.fromarray(big), 32)), pattern[:, 16:48])


def test_adm_center_crop_any_aspect_gives_square():
    for w, h in [(100, 37), (37, 100), (513, 512), (33, 33)]:
        assert adm_center_crop(Image.new("RGB", (w, h)), 32).size == (32, 32)


def test_to_tensor_to_uint8_round_trip_exactly():
    img = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3).__mod__(256).astype(np.uint8)
    x = to_tensor(img)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(to_uint8(x), img)
    batch = np.stack([img, img[::-1]])
    assert to_tensor(batch).shape == (2, 3, 16, 16)
    assert np.array_equal(to_uint8(to_tensor(batch)), batch)
    assert to_uint8(torch.tensor([-3.0, 3.0, 0.0]).view(3, 1, 1)).ravel().tolist() == [0, 255, 128]
    with pytest.raises(ValueError):
        to_tensor(img.astype(np.float32))


def test_save_png_is_atomic_and_lossless(tmp_path):
    img = render(7).image
    path = tmp_path / "deep" / "x.png"
    save_png(img, path)
    assert np.array_equal(np.asarray(Image.open(path)), img)
    assert os.listdir(path.parent) == ["x.png"]  # no temp file left behind
