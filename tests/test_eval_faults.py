"""eval_fid.py and evaluation/ under bad input and re-runs: every bad input ends in one line
naming the file or key and what to do (before the network loads when that is cheap), no metric
is ever NaN, and re-scoring the same inputs leaves metrics.json untouched.

Most tests use FakeExtractor, a fixed random projection of the pixels standing in for the
Inception network: the checks under test do not depend on which features come out, and it
needs no weights and no time.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import eval_fid
import evaluation
import reproduce
from common.config import ConfigError, error_line, load_config
from conftest import ROOT
from evaluation.inception import SPATIAL_DIM, Features, InceptionExtractor
from evaluation.reference import POOL_DIM, Reference, load_reference, make_reference
from evaluation.score import compute_metrics, score
from evaluation.weights import WeightsInfo

NOT_LOADED = "/nonexistent/inception.pth"  # weights= that fail if the network is ever built


class FakeExtractor(InceptionExtractor):
    """Features = pixels times a fixed random matrix: distinct per image, deterministic, cheap."""

    def __init__(self, fingerprint: str = "fake-network"):  # no weights, no network
        self.info = WeightsInfo(path="fake", source="test", fingerprint=fingerprint, has_logits=False)
        self.device = torch.device("cpu")
        self._proj: dict[int, torch.Tensor] = {}

    def forward_batch(self, images):
        x = torch.as_tensor(np.asarray(images)).reshape(len(images), -1).float() / 255  # (B, HW3)
        if x.shape[1] not in self._proj:
            rng = np.random.default_rng(0)
            self._proj[x.shape[1]] = torch.from_numpy(
                rng.standard_normal((x.shape[1], POOL_DIM + SPATIAL_DIM), dtype=np.float32))
        out = x @ self._proj[x.shape[1]]
        return {"pool": out[:, :POOL_DIM], "spatial": out[:, POOL_DIM:]}


def _images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _png_folder(path, n, seed=0):
    path.mkdir(parents=True)
    for i, im in enumerate(_images(n, seed=seed)):
        Image.fromarray(im).save(path / f"{i:03d}.png")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Good and bad inputs, made once: eval_fid only reads them."""
    d = tmp_path_factory.mktemp("inputs")
    _png_folder(d / "pngs", 4)
    _png_folder(d / "one", 1)
    (d / "corrupt").mkdir()
    for name in ("000.png", "002.png"):
        (d / "corrupt" / name).write_bytes((d / "pngs" / name).read_bytes())
    (d / "corrupt" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    _png_folder(d / "bad_labels", 3)
    (d / "bad_labels" / "labels.json").write_text('{"000": 1, "001": ')  # cut short
    (d / "text.npz").write_text("mu sigma\n")
    (d / "png.npz").write_bytes((d / "pngs" / "000.png").read_bytes())  # a PNG renamed .npz
    np.savez(d / "no_mu.npz", arr_0=_images(2))
    np.savez(d / "samples.npz", arr_0=_images(4, seed=1))
    make_reference(_images(6, seed=2), d / "ref.npz", extractor=FakeExtractor(), progress=False)
    with np.load(d / "ref.npz") as npz:
        arrays = dict(npz)
    arrays["arr_0_pool"][1, 5] = np.nan
    np.savez(d / "nan_pool.npz", **arrays)
    return d


# every input eval_fid refuses: (arguments, what the one line must contain); {d} is the folder
BAD_INPUTS = {
    "missing images": (["images={d}/nope", "ref={d}/ref.npz"], "images={d}/nope not found"),
    "ref is text": (["images={d}/pngs", "ref={d}/text.npz"],
                    "{d}/text.npz is not an .npz file (it is text"),
    "ref is a PNG": (["images={d}/pngs", "ref={d}/png.npz"],
                     "{d}/png.npz is not an .npz file (it is a PNG image)"),
    "ref lacks mu/sigma": (["images={d}/pngs", "ref={d}/no_mu.npz"],
                           "{d}/no_mu.npz: reference needs 'mu' and 'sigma'"),
    "NaN in arr_0_pool": (["images={d}/pngs", "ref={d}/nan_pool.npz"],
                          "{d}/nan_pool.npz: 'arr_0_pool' has non-finite values"),
    "one image": (["images={d}/one", "ref={d}/ref.npz"], "images={d}/one holds 1 image; FID needs"),
    "corrupt PNG": (["images={d}/corrupt", "ref={d}/ref.npz"], "cannot read image {d}/corrupt/001.png"),
    "labels.json cut short": (["images={d}/bad_labels", "ref={d}/ref.npz"],
                              "{d}/bad_labels/labels.json is not a "),
    "images not an npz": (["images={d}/png.npz", "ref={d}/ref.npz"],
                          "{d}/png.npz is not an .npz file (it is a PNG image)"),
    "missing ref": (["images={d}/pngs", "ref={d}/nope.npz"], "ref={d}/nope.npz not found"),
    "out is an input": (["images={d}/samples.npz", "ref={d}/ref.npz", "out={d}/ref.npz"],
                        "out={d}/ref.npz is also an input"),
    "batch_size 0": (["images={d}/pngs", "ref={d}/ref.npz", "batch_size=0"],
                     "batch_size=0 is out of range: it must be >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_ends_in_one_line_before_the_network_loads(case, inputs, monkeypatch, capfd):
    """eval_fid.py's __main__, run in this process (a subprocess each would cost ~5 s)."""
    args, expected = BAD_INPUTS[case]
    loads = []
    monkeypatch.setattr(evaluation, "InceptionExtractor", lambda *a, **k: loads.append(a))
    monkeypatch.setattr(sys, "argv", ["eval_fid.py", *(a.format(d=inputs) for a in args),
                                      "progress=false"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "eval_fid.py"), run_name="__main__")
    message = exit_.value.code  # what Python prints to stderr, with exit status 1
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    assert expected.format(d=inputs) in message
    assert "Traceback" not in capfd.readouterr().err
    assert loads == []  # refused before the network was built


def test_bad_inputs_in_a_real_process(inputs):
    """The same, as a user sees it: exit status 1 and exactly one line on stderr."""
    cases = ["ref is a PNG", "one image", "corrupt PNG"]
    procs = {c: subprocess.Popen([sys.executable, str(ROOT / "eval_fid.py"),
                                  *(a.format(d=inputs) for a in BAD_INPUTS[c][0])],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in cases}  # started together: the imports overlap
    for case, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert proc.returncode == 1, (case, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
        assert BAD_INPUTS[case][1].format(d=inputs) in lines[0] and "Traceback" not in err


def test_unreadable_data_found_mid_run_is_one_line_without_the_worker_traceback(inputs, tmp_path):
    # a PNG whose header is fine but whose pixels are cut off passes the header scan and fails
    # to decode inside a DataLoader worker, which pastes its traceback into the error's message
    folder = _png_folder(tmp_path / "cut", 4)
    data = (folder / "002.png").read_bytes()
    (folder / "002.png").write_bytes(data[:len(data) // 2])
    cfg = eval_fid.EvalConfig(images=str(folder), ref=str(inputs / "ref.npz"), num_workers=1,
                              num_expected=0, progress=False)
    with pytest.raises(ValueError) as err:
        eval_fid.main(cfg, FakeExtractor())
    line = error_line(err.value)
    assert line.startswith(f"cannot read image {folder / '002.png'}") and "Traceback" not in line
    assert not (folder / "metrics.json").exists()
    # an .npz whose arr_0 bytes were changed: zipfile's CRC check names no file
    broken = bytearray((inputs / "samples.npz").read_bytes())
    broken[len(broken) // 2] ^= 0xFF
    (tmp_path / "flipped.npz").write_bytes(bytes(broken))
    cfg.images = str(tmp_path / "flipped.npz")
    with pytest.raises(ValueError, match=f"{tmp_path / 'flipped.npz'}: .*'arr_0'.*damaged"):
        eval_fid.main(cfg, FakeExtractor())


def test_fewer_than_two_images_fail_before_the_network(tmp_path):
    # weights that do not exist: reaching the network would raise WeightsNotFoundError instead
    with pytest.raises(ValueError, match="holds 1 image; FID needs at least 2"):
        make_reference(_images(1), tmp_path / "ref.npz", weights=NOT_LOADED)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(POOL_DIM), sigma=np.eye(POOL_DIM, dtype=np.float32))
    with pytest.raises(ValueError, match="holds 1 image; FID needs at least 2"):
        score(_images(1), tmp_path / "stats.npz", weights=NOT_LOADED)


def test_no_metric_is_ever_non_finite(monkeypatch):
    rng = np.random.default_rng(0)
    pool = rng.normal(size=(12, POOL_DIM)).astype(np.float32)
    feats = Features(pool=pool, spatial=None, logits=rng.normal(size=(12, 1008)))
    ref = Reference("ref.npz", "0", pool.mean(0).astype(np.float64), np.eye(POOL_DIM))
    ok, _ = compute_metrics(feats, ref, pool.copy(), {"fid", "kid", "is"}, True, 0, 5, "cpu")
    assert np.isfinite(ok["fid"]) and np.isfinite(ok["kid"]["mean"]) and np.isfinite(ok["is"]["mean"])
    # a NaN in the reference's stored features (arr_0_pool) makes KID NaN
    ref_pool = pool.copy()
    ref_pool[3, 7] = np.nan
    with pytest.raises(ValueError, match="KID mean came out non-finite.*arr_0_pool"):
        compute_metrics(feats, ref, ref_pool, {"kid"}, False, 0, 5, "cpu")
    feats.logits[0, 0] = np.inf
    with pytest.raises(ValueError, match=r"Inception Score \(IS\) .*came out non-finite.*logits"):
        compute_metrics(feats, ref, None, {"is"}, True, 0, 5, "cpu")
    monkeypatch.setattr(sys.modules["evaluation.score"], "precision_recall", lambda *a: (np.nan, 0.5))
    with pytest.raises(ValueError, match="precision came out non-finite"):
        compute_metrics(feats, ref, pool, {"pr"}, False, 0, 5, "cpu")


def test_rescoring_the_same_inputs_keeps_metrics_json(inputs, tmp_path, capsys):
    samples = tmp_path / "samples.npz"
    samples.write_bytes((inputs / "samples.npz").read_bytes())
    out = tmp_path / "metrics.json"

    def run(extractor=None, **changes):
        cfg = eval_fid.EvalConfig(images=str(samples), ref=str(inputs / "ref.npz"), out=str(out),
                                  num_expected=4, progress=False, **changes)
        result = eval_fid.main(cfg, extractor or FakeExtractor())
        return result, capsys.readouterr().out.strip().splitlines()[-1]

    first, _ = run()
    before = out.read_bytes(), out.stat().st_mtime_ns
    again, line = run(batch_size=3)  # batch_size only moves rounding: not part of the identity
    assert again["skipped"] and (out.read_bytes(), out.stat().st_mtime_ns) == before
    assert line.startswith("FID ") and line.endswith(eval_fid.KEPT_NOTE)
    assert again["metrics"] == first["metrics"]
    # anything that changes the numbers scores again
    for changes in ({"seed": 1}, {"kid_subset_size": 3}, {"metrics": ["fid"]}, {"force": True}):
        redone, line = run(**changes)
        assert "skipped" not in redone and eval_fid.KEPT_NOTE not in line, changes
    assert "skipped" not in run(FakeExtractor("another-network"))[0]
    assert "skipped" not in run()[0] and run()[0]["skipped"]  # back to the first network
    mtime = samples.stat().st_mtime_ns + 10**9
    os.utime(samples, ns=(mtime, mtime))  # a new mtime: the files_stamp changes, as images may
    assert "skipped" not in run()[0]


@pytest.mark.parametrize("override, message", [
    ("batch_size=0", "batch_size=0 is out of range: it must be >= 1"),
    ("num_workers=-1", "num_workers=-1 is out of range: it must be >= 0"),
    ("kid_subset_size=1", "kid_subset_size=1 is out of range: it must be >= 2"),
    ("keep_images=-5", "keep_images=-5 is out of range: it must be >= 0"),
    ("num_expected=-1", "num_expected=-1 is out of range: it must be >= 0"),
    ("resolution=-32", "resolution=-32 is out of range: it must be >= 0"),
    ("device=gpu", "device='gpu' is out of range: it must be one of auto, cpu, cuda"),
    ("metrics=[]", "metrics=[] asks for nothing"),
])
def test_eval_config_ranges_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(eval_fid.EvalConfig, overrides=["images=x", "ref=r.npz", override])
    assert message in str(err.value)


REPRODUCE_REQUIRED = ["name=x", "ckpt=G.pt", "tokenizer_ckpt=VQ.pt", "ref=REF.npz"]


@pytest.mark.parametrize("override, message", [
    ("num_images=1", "num_images=1 is out of range: it must be >= 2"),
    ("nproc=-1", "nproc=-1 is out of range: it must be >= 0"),
    ("shard_size=0", "shard_size=0 is out of range: it must be >= 1"),
    ("eval_size=0", "eval_size=0 is out of range: it must be >= 1"),
    ("published_fid=-1.0", "published_fid=-1.0 is out of range: it must be >= 0"),
    ("device=tpu", "device='tpu' is out of range: it must be one of auto, cpu, cuda"),
    ("precision=fp8", "precision='fp8' is out of range: it must be one of auto, bf16, fp32"),
    ("layout=zero", "layout='zero' is out of range: it must be one of auto, ddp, fsdp, deepspeed"),
])
def test_reproduce_config_ranges_name_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(reproduce.ReproduceConfig, overrides=REPRODUCE_REQUIRED + [override])
    assert message in str(err.value)


def test_reproduce_cli_error_is_one_line(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(sys, "argv", ["reproduce.py", *REPRODUCE_REQUIRED[:3],
                                      f"ref={tmp_path / 'missing.npz'}", f"out={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(ROOT / "reproduce.py"), run_name="__main__")
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message
    assert f"{tmp_path / 'missing.npz'} not found" in message
    assert "Traceback" not in capfd.readouterr().err and not (tmp_path / "run").exists()


def test_not_an_npz_is_named_in_the_library_too(inputs, tmp_path):
    with pytest.raises(ValueError, match="is not an .npz file \\(it is text"):
        load_reference(inputs / "text.npz")
    cut = tmp_path / "cut.npz"  # an interrupted copy
    cut.write_bytes((inputs / "ref.npz").read_bytes()[:5000])
    assert not zipfile.is_zipfile(cut)
    with pytest.raises(ValueError, match="zip archive cut short"):
        load_reference(cut)
