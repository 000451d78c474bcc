"""reproduce.py: the recipe configs follow LlamaGen's protocol, and the whole chain (convert ->
sample -> pack/resize -> score -> table row) runs end to end on the tiny LlamaGen fixtures,
resuming after an interruption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import reproduce
from common.config import ConfigError, load_config
from conftest import FIXTURES, ROOT
from evaluation import InceptionExtractor, WeightsNotFoundError, make_reference, resolve_weights
from sampling.outputs import pack_npz, write_shard

CONFIGS = ROOT / "configs" / "reproduce"
REQUIRED = ["ckpt=G.pt", "tokenizer_ckpt=VQ.pt", "ref=REF.npz"]
# LlamaGen README / GETTING_STARTED.md: (resolution, CFG scale, FID)
LLAMAGEN = {"B": (256, 2.0, 5.46), "B-384": (384, 2.0, 6.09), "L-256": (256, 2.0, 3.80),
            "L": (384, 2.0, 3.07), "XL": (384, 1.75, 2.62), "XXL": (384, 1.75, 2.34),
            "3B": (384, 1.65, 2.18)}


@pytest.mark.parametrize("size", sorted(LLAMAGEN))
def test_recipes_follow_llamagen_protocol(size):
    cfg = load_config(reproduce.ReproduceConfig, [CONFIGS / f"llamagen-{size}.yaml"], REQUIRED)
    s = cfg.sampling
    assert (cfg.image_size, s.cfg_scale, cfg.published_fid) == LLAMAGEN[size]
    assert cfg.eval_size == 256 and cfg.num_images == 50000 and cfg.labels == "random"
    assert (s.cfg_schedule, s.temperature, s.top_k, s.top_p) == ("constant", 1.0, 0, 1.0)


# xAR README eval commands: (CFG, SDE steps, FID); 50 images per class, linear CFG over the cells
XAR = {"B": (2.7, 40, 1.72), "L": (2.3, 50, 1.28), "H": (2.2, 50, 1.24)}


@pytest.mark.parametrize("size", sorted(XAR))
def test_recipes_follow_xar_protocol(size):
    cfg = load_config(reproduce.ReproduceConfig, [CONFIGS / f"xar-{size}.yaml"], REQUIRED)
    s = cfg.sampling
    assert (s.cfg_scale, s.flow_steps, cfg.published_fid) == XAR[size]
    assert (cfg.family, cfg.size, cfg.labels, cfg.num_images) == ("xar", f"xAR-{size}", "balanced", 50000)
    assert (s.cfg_schedule, s.flow_sampler, cfg.image_size, cfg.eval_size) == ("linear_full", "sde", 256, 256)


# VAR's README: FID per depth; its FID protocol is cfg 1.5 on its ramp (argen's cfg_scale 2.5,
# linear_full), top-k 900, top-p 0.96, 50 images per class
VAR = {16: 3.55, 20: 2.95, 24: 2.33, 30: 1.97}


@pytest.mark.parametrize("depth", sorted(VAR))
def test_recipes_follow_var_protocol(depth):
    cfg = load_config(reproduce.ReproduceConfig, [CONFIGS / f"var-d{depth}.yaml"], REQUIRED)
    s = cfg.sampling
    assert (cfg.family, cfg.size, cfg.published_fid) == ("var", f"VAR-d{depth}", VAR[depth])
    assert (cfg.labels, cfg.num_images, cfg.image_size, cfg.eval_size) == ("balanced", 50000, 256, 256)
    assert (s.cfg_scale, s.cfg_schedule, s.top_k, s.top_p, s.temperature) == (2.5, "linear_full", 900, 0.96, 1.0)


def test_multi_gpu_sampling_goes_through_torchrun():
    cmd = reproduce.sample_command(4, ["out=x"])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4"]
    assert cmd[-2:] == [str(ROOT / "sample.py"), "out=x"]
    assert reproduce.sample_command(1, ["out=x"])[1:] == [str(ROOT / "sample.py"), "out=x"]


def test_pack_streams_shards_and_resizes_bicubic(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 16, 16, 3), dtype=np.uint8)
    for k, ids in enumerate([range(0, 4), range(4, 7)]):
        write_shard(tmp_path, k, np.array(ids), images[list(ids)], np.array(ids) % 3)
    same = np.load(reproduce.pack_for_eval(tmp_path, 7, 4, 16, tmp_path / "a.npz", progress=False))
    pack_npz(tmp_path, 2, tmp_path / "b.npz")  # sample.py's own packer
    assert np.array_equal(same["arr_0"], np.load(tmp_path / "b.npz")["arr_0"])
    assert same["arr_1"].tolist() == [0, 1, 2, 0, 1, 2, 0]
    small = np.load(reproduce.pack_for_eval(tmp_path, 7, 4, 12, tmp_path / "c.npz", progress=False))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    y = F.interpolate(x, size=(12, 12), mode="bicubic", align_corners=False)
    want = ((y + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
    assert small["arr_0"].shape == (7, 12, 12, 3) and np.array_equal(small["arr_0"], want)


def test_missing_reference_fails_before_any_work(tmp_path):
    cfg = load_config(reproduce.ReproduceConfig, [CONFIGS / "llamagen-B.yaml"],
                      [f"ckpt={FIXTURES / 'llamagen_gpt_c2i_tiny.pt'}", "tokenizer_ckpt=VQ.pt",
                       f"ref={tmp_path / 'missing.npz'}", f"out={tmp_path / 'run'}"])
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        reproduce.main(cfg)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def extractor():
    try:
        path = resolve_weights()
    except WeightsNotFoundError as e:
        pytest.skip(f"no TF-Inception weights ({str(e)[:80]}...); run scripts/get_inception.py")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI machine has 2 busy cores
    yield InceptionExtractor(path, device="cpu")
    torch.set_num_threads(before)


def tiny_llamagen(tmp_path, extractor, *overrides: str) -> reproduce.ReproduceConfig:
    """LlamaGen-B's recipe on the tiny fixtures: the tiny GPT predicts 256 codes and the tiny VQ
    has 64, so keep the GPT's first 64 code rows (8x8 codes, the VQ downsamples by 2: 16 px)."""
    state = torch.load(FIXTURES / "llamagen_gpt_c2i_tiny.pt", weights_only=True)["model"]
    for key in ("tok_embeddings.weight", "output.weight"):
        state[key] = state[key][:64].clone()
    torch.save({"model": state, "steps": 1}, tmp_path / "c2i_tiny_16.pt")
    ref = tmp_path / "ref.npz"
    real = np.random.default_rng(1).integers(0, 256, (10, 12, 12, 3), dtype=np.uint8)
    make_reference(real, ref, extractor=extractor, progress=False)
    return load_config(reproduce.ReproduceConfig, [CONFIGS / "llamagen-B.yaml"], [
        f"ckpt={tmp_path / 'c2i_tiny_16.pt'}", f"tokenizer_ckpt={FIXTURES / 'llamagen_vq_tiny.pt'}",
        f"ref={ref}", f"out={tmp_path / 'run'}", f"table={tmp_path / 'results.md'}", "image_size=16",
        "n_head=4", "num_classes=10",  # the fixture's (not a LlamaGen size; README)
        "eval_size=12", "num_images=8", "batch_size=4", "shard_size=4", "device=cpu", "nproc=1",
        "metrics=[fid,sfid,pr]", *overrides])


@pytest.mark.skipif(not (FIXTURES / "llamagen_vq_tiny.pt").is_file(), reason=f"no fixtures at {FIXTURES}")
def test_end_to_end_on_tiny_llamagen_and_resume(tmp_path, extractor):
    cfg = tiny_llamagen(tmp_path, extractor)
    out, table = tmp_path / "run", tmp_path / "results.md"
    result = reproduce.main(cfg, extractor)
    assert np.isfinite(result["metrics"]["fid"]) and np.isfinite(result["metrics"]["sfid"])
    assert result["reproduce"]["checkpoint"]["file"] == "c2i_tiny_16.pt"
    assert result["reproduce"]["resize"] == "bicubic 16 -> 12"
    assert json.loads((out / "metrics.json").read_text())["metrics"] == result["metrics"]
    packed = np.load(out / "samples_12.npz")["arr_0"]
    assert packed.shape == (8, 12, 12, 3)
    rows = table.read_text().splitlines()
    assert len(rows) == 3 and "LlamaGen-B" in rows[2] and "5.46" in rows[2]
    assert result["reproduce"]["checkpoint"]["sha256"][:12] in rows[2]
    assert result["inception"]["fingerprint"][:12] in rows[2]

    # interrupted: shard 1 never finished and nothing was packed; the same command resumes
    kept = out / "samples" / "shard_00000" / "labels.json"
    stamp = kept.stat().st_mtime_ns
    for p in (out / "samples" / "shard_00001").iterdir():
        p.unlink()
    (out / "samples" / "shard_00001").rmdir()
    (out / "samples_12.npz").unlink()
    again = reproduce.main(cfg, extractor)
    assert kept.stat().st_mtime_ns == stamp  # not redone
    assert np.array_equal(np.load(out / "samples_12.npz")["arr_0"], packed)
    assert again["metrics"]["fid"] == pytest.approx(result["metrics"]["fid"], abs=1e-6)
    assert len(table.read_text().splitlines()) == 4

    # finished: running it again keeps metrics.json and adds no row for the same numbers
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (out / "metrics.json", table)}
    assert reproduce.main(cfg, extractor)["metrics"] == again["metrics"]
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before


@pytest.mark.skipif(not (FIXTURES / "llamagen_vq_tiny.pt").is_file(), reason=f"no fixtures at {FIXTURES}")
def test_speculative_sampler_is_recorded_in_the_result_and_the_row(tmp_path, extractor):
    cfg = tiny_llamagen(tmp_path, extractor, "sampler=coupled", "speculative.window=8")
    result = reproduce.main(cfg, extractor)
    record = result["sampler"]
    assert (record["sampler"], record["speculative"]["window"], record["images"]) == ("coupled", 8, 8)
    assert record["plain_forward_passes_per_image"] == 63  # 64 tokens, the first from the prefill
    assert record["forward_passes_per_image"] < 63 and record["mean_accepted_length"] > 1
    assert "coupled window 8" in (tmp_path / "results.md").read_text().splitlines()[2]
    with pytest.raises(ConfigError, match="family=xar models need sampler=plain"):
        load_config(reproduce.ReproduceConfig, [CONFIGS / "xar-B.yaml"], REQUIRED + ["sampler=gsd"])


XAR_FIXTURES = FIXTURES.parent / "xar"
MAR_VAE = FIXTURES.parent / "mar_vae" / "mar_vae_tiny.pt"


@pytest.mark.skipif(not MAR_VAE.is_file(), reason=f"no xAR/MAR fixtures beside {FIXTURES}")
def test_end_to_end_on_tiny_xar(tmp_path, extractor):
    """xAR + MAR's VAE from their release layouts: convert, sample with the SDE, score, row.
    The tiny VAE downsamples by 2, so the 16 x 16 latents are 32 px images."""
    ref = tmp_path / "ref.npz"
    real = np.random.default_rng(1).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    make_reference(real, ref, extractor=extractor, progress=False)
    out, table = tmp_path / "run", tmp_path / "results.md"
    args = [f"ckpt={XAR_FIXTURES / 'xar_tiny.pt'}", f"tokenizer_ckpt={MAR_VAE}", f"ref={ref}",
            f"out={out}", f"table={table}", "image_size=32", "eval_size=32", "num_images=4",
            "batch_size=2", "shard_size=2", "device=cpu", "nproc=1", "metrics=[fid]",
            "sampling.flow_steps=2"]
    with pytest.raises(ValueError, match="not xAR-B"):  # the config is for xAR-B
        reproduce.main(load_config(reproduce.ReproduceConfig, [CONFIGS / "xar-B.yaml"], args), extractor)
    cfg = load_config(reproduce.ReproduceConfig, [CONFIGS / "xar-B.yaml"], args + ["size=''"])
    result = reproduce.main(cfg, extractor)
    assert np.isfinite(result["metrics"]["fid"])
    assert result["reproduce"]["checkpoint"]["file"] == "xar_tiny.pt"
    assert np.load(out / "samples_32.npz")["arr_0"].shape == (4, 32, 32, 3)
    rows = table.read_text().splitlines()
    assert len(rows) == 3 and "xAR-B" in rows[2] and "SDE 2 steps" in rows[2] and "linear_full" in rows[2]


VAR_FIXTURES = FIXTURES.parent / "var"


@pytest.mark.skipif(not (VAR_FIXTURES / "var_tiny.pth").is_file(), reason=f"no VAR fixtures beside {FIXTURES}")
def test_end_to_end_on_tiny_var(tmp_path, extractor):
    """VAR + its VQVAE from their release layouts: convert (with the fixture's 4-scale schedule),
    sample next-scale with top-k/top-p and VAR's CFG ramp, score, row. 4 x 4 latents: 64 px."""
    ref = tmp_path / "ref.npz"
    real = np.random.default_rng(1).integers(0, 256, (10, 64, 64, 3), dtype=np.uint8)
    make_reference(real, ref, extractor=extractor, progress=False)
    out, table = tmp_path / "run", tmp_path / "results.md"
    args = [f"ckpt={VAR_FIXTURES / 'var_tiny.pth'}", f"tokenizer_ckpt={VAR_FIXTURES / 'var_vqvae_tiny.pth'}",
            f"ref={ref}", f"out={out}", f"table={table}", "image_size=64", "eval_size=64", "num_images=4",
            "batch_size=2", "shard_size=2", "device=cpu", "nproc=1", "metrics=[fid]", "patch_nums=[1,2,3,4]",
            "sampling.top_k=10"]
    with pytest.raises(ValueError, match="not VAR-d16"):  # the config is for VAR-d16
        reproduce.main(load_config(reproduce.ReproduceConfig, [CONFIGS / "var-d16.yaml"], args), extractor)
    cfg = load_config(reproduce.ReproduceConfig, [CONFIGS / "var-d16.yaml"], args + ["size=''"])
    result = reproduce.main(cfg, extractor)
    assert np.isfinite(result["metrics"]["fid"])
    assert result["reproduce"]["checkpoint"]["file"] == "var_tiny.pth"
    assert np.load(out / "samples_64.npz")["arr_0"].shape == (4, 64, 64, 3)
    rows = table.read_text().splitlines()
    assert len(rows) == 3 and "VAR-d16" in rows[2] and "top-k 10, top-p 0.96" in rows[2] and "linear_full" in rows[2]


# ----------------------------------------------------------------------------- the guidance rule

@pytest.mark.parametrize("recipe, scale, sampled", [("llamagen-B", 0.5, 1.0), ("llamagen-B", 1.75, 1.75),
                                                    ("xar-B", 0.5, 0.5), ("var-d16", 0.5, 0.5)])
def test_each_family_is_guided_as_its_release_guides(monkeypatch, tmp_path, recipe, scale, sampled):
    """LlamaGen's sample_c2i/generate double the batch only when cfg_scale > 1: below 1 it
    samples unguided (argen's cfg_scale=1), where argen, xAR and VAR guide toward the null class."""
    sampling = {}

    def stop(cfg, *args):
        sampling.update(cfg=cfg)
        raise InterruptedError

    monkeypatch.setattr(reproduce, "load_reference", lambda path: None)
    monkeypatch.setattr(reproduce, "resolve_weights", lambda path: None)
    monkeypatch.setattr(reproduce, "convert_release", lambda cfg, folder: (folder / "g", folder / "t"))
    monkeypatch.setattr(reproduce, "run_sampling", stop)
    cfg = load_config(reproduce.ReproduceConfig, [CONFIGS / f"{recipe}.yaml"],
                      REQUIRED + [f"sampling.cfg_scale={scale}", f"out={tmp_path}"])
    with pytest.raises(InterruptedError):
        reproduce.main(cfg)
    assert sampling["cfg"].sampling.cfg_scale == sampled
    overrides = reproduce.sample_overrides(sampling["cfg"], tmp_path / "g", tmp_path / "s")
    assert f"sampling.cfg_scale={sampled}" in overrides
