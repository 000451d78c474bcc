"""Latent caches: `tokenizer.encode` with a KL tokenizer (posterior moments in float16, image and
mirror, sharded and resumable), meta.json of the continuous kind, and the generator's stream of
latents sampled per visit (deterministic, world-size independent), with the kind mismatches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ar.conditioning.label import LabelSource
from ar.data import BatchStream, CodeCache, LatentCache, open_cache
from conftest import make_code_cache, make_image_folder
from dataset.folder import ClassFolderDataset
from tokenizer import load_tokenizer, save_tokenizer
from tokenizer.cache import make_meta, read_meta, shard_name
from tokenizer.encode import main
from tokenizer.kl import KLConfig, KLModel

CFG = KLConfig(block_out_channels=[32, 32], layers_per_block=1, latent_channels=4,
               encoder_attention=[], latent_scale=0.5)


@pytest.fixture
def folder(tmp_path) -> Path:
    """2 classes x 4 random 16x16 images."""
    return make_image_folder(tmp_path / "data", 16)


@pytest.fixture
def weights(tmp_path) -> Path:
    torch.manual_seed(0)
    model = KLModel(CFG)
    for p in model.parameters():  # random weights everywhere (init zeroes residual branches)
        torch.nn.init.normal_(p, std=0.1)
    return save_tokenizer(model, CFG, tmp_path / "tok" / "kl.safetensors")


def encode(folder, weights, out, **kw) -> dict:
    args = {"data.root": folder, "data.resolution": 16, "tokenizer": weights, "out": out,
            "batch_size": 3, "shard_size": 3, "num_workers": 0, **kw}
    return main([f"{k}={v}" for k, v in args.items()])


def make_latent_cache(path: Path, n: int = 20, channels: int = 2, grid: int = 2, logvar: float = 0.0,
                      shard_size: int = 8, scale: float = 0.5, shift: float = 0.0) -> Path:
    """A continuous cache as `tokenizer.encode` writes it: image i's posterior mean is i
    everywhere (its flip: -i), with the given log-variance."""
    path.mkdir(parents=True, exist_ok=True)
    mean = np.arange(n, dtype=np.float32)[:, None, None, None, None] * np.array([1, -1])[None, :, None, None, None]
    moments = np.concatenate([np.broadcast_to(mean, (n, 2, channels, grid, grid)),
                              np.full((n, 2, channels, grid, grid), logvar)], axis=2).astype(np.float16)
    labels, shards = np.arange(n) % 2, []
    for k, start in enumerate(range(0, n, shard_size)):
        sl = slice(start, min(n, start + shard_size))
        data, label_file = shard_name(k, "continuous")
        np.save(path / data, moments[sl])
        np.save(path / label_file, labels[sl].astype(np.int64))
        shards.append({"moments": data, "labels": label_file, "count": sl.stop - sl.start})
    tok = {"name": "kl", "path": "", "sha256": "", "config": {}}
    facts = {"kind": "continuous", "channels": channels, "latent_scale": scale, "latent_shift": shift}
    meta = make_meta(tok, grid * 4, (grid, grid), facts, labels, ["a", "b"], shards, False, str(path), [])
    (path / "meta.json").write_text(json.dumps(meta))
    return path


# ---------------------------------------------------------------- encoding

def test_encode_stores_posterior_moments_of_image_and_mirror(folder, weights, tmp_path):
    out = tmp_path / "latents"
    meta = encode(folder, weights, out)
    assert meta == read_meta(out)
    assert meta["kind"] == "continuous" and meta["channels"] == 4 and "codebook_size" not in meta
    assert (meta["latent_scale"], meta["latent_shift"], meta["grid"]) == (0.5, 0.0, [8, 8])
    assert meta["tokenizer"]["name"] == "kl" and len(meta["tokenizer"]["sha256"]) == 64
    assert [s["moments"] for s in meta["shards"]] == [f"moments_{k:05d}.npy" for k in range(3)]
    moments = np.concatenate([np.load(out / s["moments"]) for s in meta["shards"]])
    assert moments.dtype == np.float16 and moments.shape == (8, 2, 8, 8, 8)
    ds = ClassFolderDataset(folder, 16)
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    model = load_tokenizer(weights)
    with torch.no_grad():
        for v, images in enumerate((x, x.flip(-1))):
            want = model.moments(images).numpy()
            np.testing.assert_allclose(moments[:, v].astype(np.float32), want, atol=2e-3, rtol=1e-3)


def test_latent_encode_resumes_and_refuses_mixing(folder, weights, tmp_path):
    out = tmp_path / "latents"
    meta = encode(folder, weights, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "meta.json").unlink()
    (out / "moments_00001.npy").unlink()
    assert encode(folder, weights, out) == meta
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code_weights = tmp_path / "vq.safetensors"
    from tokenizer.vq import VQConfig, VQModel

    vq_cfg = VQConfig(codebook_size=16, ch=32, ch_mult=[1, 2], z_channels=8, num_res_blocks=1)
    save_tokenizer(VQModel(vq_cfg), vq_cfg, code_weights)
    with pytest.raises(SystemExit, match="different settings.*tokenizer_sha256"):
        encode(folder, code_weights, out)


def test_a_diffusers_folder_encodes_with_its_scaling_factor(folder, tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[32, 32], layers_per_block=1, latent_channels=4,
                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                  scaling_factor=0.3).save_pretrained(tmp_path / "vae")
    meta = encode(folder, tmp_path / "vae", tmp_path / "latents")
    assert (meta["kind"], meta["channels"], meta["latent_scale"]) == ("continuous", 4, 0.3)
    assert meta["tokenizer"]["name"] == "kl" and meta["tokenizer"]["path"] == str((tmp_path / "vae").resolve())
    assert LatentCache(tmp_path / "latents").count == 8


def test_kl_tokenizer_without_a_scale_is_refused(folder, tmp_path):
    cfg = KLConfig(**{**CFG.__dict__, "latent_scale": 0.0})
    weights = save_tokenizer(KLModel(cfg), cfg, tmp_path / "kl0.safetensors")
    with pytest.raises(SystemExit, match="latent_scale 0.0; export it with `python -m tokenizer.train`"):
        encode(folder, weights, tmp_path / "latents")


# ---------------------------------------------------------------- the data stream

def test_latent_cache_reads_moments_across_shards(tmp_path):
    cache = open_cache(make_latent_cache(tmp_path / "c", n=20, shard_size=8))
    assert isinstance(cache, LatentCache) and cache.count == 20 and cache.channels == 2
    m = cache.get(np.array([17, 3, 9]), np.array([0, 1, 0]))
    assert m.shape == (3, 4, 2, 2) and m.dtype == torch.float32
    assert m[:, 0, 0, 0].tolist() == [17.0, -3.0, 9.0] and m[:, 2:].abs().max() == 0


def test_stream_samples_scaled_latents_deterministically(tmp_path):
    cache = LatentCache(make_latent_cache(tmp_path / "c", n=20, logvar=-30.0, shift=1.0))
    stream = BatchStream(cache, seed=3, cond_dropout=0.0, source=LabelSource(cache))
    latents, cond = stream.batch(15, 10)  # crosses the epoch boundary at 20
    assert latents.shape == (10, 2, 2, 2) and latents.dtype == torch.float32
    indices, variants, _ = stream.plan(15, 10)
    sign = 1 - 2 * variants  # exp(-15) ~ 3e-7: the sample is the mean, (mean - shift) * scale
    want = (torch.from_numpy(indices * sign).float() - 1.0) * 0.5
    torch.testing.assert_close(latents[:, 0, 0, 0], want, atol=1e-5, rtol=0)
    assert torch.equal(cond.labels, torch.from_numpy(indices % 2))


def test_stream_noise_is_keyed_by_position_not_by_batch_or_rank(tmp_path):
    cache = LatentCache(make_latent_cache(tmp_path / "c", n=20, logvar=0.0))
    stream = BatchStream(cache, seed=3, cond_dropout=0.25, source=LabelSource(cache))
    latents, cond = stream.batch(8, 12)
    again = BatchStream(cache, seed=3, cond_dropout=0.25, source=LabelSource(cache)).batch(8, 12)
    assert torch.equal(latents, again[0]) and torch.equal(cond.labels, again[1].labels)
    for world in (2, 3, 4):  # every split of the global batch over ranks gives the same batch
        per = 12 // world
        parts = [stream.batch(8 + r * per, per) for r in range(world)]
        assert torch.equal(torch.cat([p[0] for p in parts]), latents)
    noise = latents / 0.5 - cache.get(*stream.plan(8, 12)[:2])[:, :2]  # std exp(0)=1: the noise
    assert 0.6 < noise.std().item() < 1.4
    other = BatchStream(cache, seed=4, cond_dropout=0.25, source=LabelSource(cache)).batch(8, 12)[0]
    assert not torch.equal(other, latents)


def test_kind_mismatches_are_named(tmp_path):
    latents = make_latent_cache(tmp_path / "latents")
    codes = make_code_cache(tmp_path / "codes")
    with pytest.raises(ValueError, match="holds continuous latents; a token head needs discrete codes"):
        CodeCache(latents)
    with pytest.raises(ValueError, match="this cache holds discrete codes; a flow model needs "
                                         "continuous latents: encode with a KL tokenizer"):
        LatentCache(codes)
    assert isinstance(open_cache(codes), CodeCache)


@pytest.mark.parametrize("change, message", [
    ({"kind": "fuzzy"}, "kind 'fuzzy' is not one of"),
    ({"latent_scale": 0}, "latent_scale=0 is not valid for a continuous cache"),
    ({"channels": None}, "channels=None is not valid"),
])
def test_read_meta_validates_the_continuous_kind(tmp_path, change, message):
    path = make_latent_cache(tmp_path / "c")
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**meta, **change}))
    with pytest.raises(ValueError, match=message):
        read_meta(path)
    (path / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "channels"}))
    with pytest.raises(ValueError, match=r"missing fields \['channels'\]"):
        read_meta(path)
