"""VQ tokenizer: LlamaGen parity, quantiser maths, weights round trip, training and resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import ROOT
from tokenizer import load_tokenizer, save_tokenizer
from tokenizer.discriminator import PatchDiscriminator, adaptive_weight, hinge_d_loss
from tokenizer.quantizer import VectorQuantizer
from tokenizer.vq import VQConfig, VQModel

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "llamagen"
needs_fixtures = pytest.mark.skipif(
    not (FIXTURES / "llamagen_vq_tiny.pt").is_file(),
    reason=f"LlamaGen fixtures not found at {FIXTURES} (they sit beside the project in shared/)")

# the tiny reference model's settings (fixtures README / llamagen_manifest.json "vq_tiny")
FIXTURE_CFG = VQConfig(codebook_size=64, codebook_dim=8, ch=32, ch_mult=[1, 2], z_channels=16,
                       num_res_blocks=2)


def tiny_cfg(**kw) -> VQConfig:
    base = dict(codebook_size=32, codebook_dim=8, ch=32, ch_mult=[1, 2], z_channels=16, num_res_blocks=1)
    base.update(kw)
    return VQConfig(**base)


def fixture_state() -> dict:
    state = torch.load(FIXTURES / "llamagen_vq_tiny.pt", weights_only=True)["model"]
    state.pop("quantize.codebook_used")  # LlamaGen's persistent usage buffer; ours is not saved
    return state


# ---------------------------------------------------------------- LlamaGen parity

@needs_fixtures
def test_state_dict_keys_match_llamagen():
    own = VQModel(FIXTURE_CFG).state_dict()
    ref = fixture_state()
    assert set(own) == set(ref)
    assert all(own[k].shape == ref[k].shape for k in ref)


@needs_fixtures
def test_vq16_recipe_matches_llamagen_manifest():
    """configs/tokenizer/vq16_imagenet256.yaml builds LlamaGen's released VQ-16 layout."""
    from common.config import load_config
    from tokenizer.train_config import TokenizerTrainConfig

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(TokenizerTrainConfig, [root / "configs/tokenizer/vq16_imagenet256.yaml"]).model
    manifest = json.loads((FIXTURES / "llamagen_manifest.json").read_text())["manifests"]
    ref = manifest["VQ-16 codebook 16384 dim 8"]
    ref.pop("quantize.codebook_used")
    with torch.device("meta"):  # shapes only: no memory, no init cost
        own = {k: list(v.shape) for k, v in VQModel(cfg).state_dict().items()}
    assert own == ref


@needs_fixtures
def test_llamagen_fixture_parity():
    from safetensors.torch import load_file

    model = VQModel(FIXTURE_CFG).eval()
    model.load_state_dict(fixture_state(), strict=True)
    ref = load_file(str(FIXTURES / "llamagen_tiny_reference.safetensors"))
    codes = model.encode(ref["vq_images"])
    assert codes.shape == (2, 16, 16) and codes.dtype == torch.int64
    assert torch.equal(codes.flatten(1), ref["vq_codes"])
    with torch.no_grad():
        zq, _, _, _ = model.quantize(model.encode_latent(ref["vq_images"]))
    torch.testing.assert_close(zq, ref["vq_quant"], atol=1e-5, rtol=0)
    decoded = model.decode(ref["vq_codes"].view(2, 16, 16))
    torch.testing.assert_close(decoded, ref["vq_decoded_from_codes"], atol=1e-5, rtol=0)


def test_usage_buffers_not_in_state_dict():
    keys = VQModel(tiny_cfg()).state_dict().keys()
    assert not any("last_used" in k or "track_step" in k for k in keys)


# ---------------------------------------------------------------- quantiser

def test_quantizer_nearest_code_and_losses():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, beta=0.25, l2_norm=True)
    z = torch.randn(2, 4, 3, 5)
    zq, idx, losses, stats = q(z)
    zn = F.normalize(z.permute(0, 2, 3, 1), dim=-1)  # (B, h, w, D)
    e = F.normalize(q.embedding.weight, dim=-1)
    brute = ((zn[..., None, :] - e) ** 2).sum(-1).argmin(-1)  # (B, h, w)
    assert torch.equal(idx, brute)
    target = e[idx]  # (B, h, w, D)
    torch.testing.assert_close(zq.permute(0, 2, 3, 1), target)
    mse = ((target - zn) ** 2).mean()
    torch.testing.assert_close(losses["codebook"], mse)
    torch.testing.assert_close(losses["commit"], 0.25 * mse)
    assert stats["usage"] == len(idx.unique()) / 16
    assert stats["counts"].sum() == idx.numel()


def test_straight_through_gradient_reaches_encoder():
    model = VQModel(tiny_cfg())
    recon, losses, _ = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    recon.pow(2).mean().backward()  # the reconstruction loss alone: only the ST path links it
    g = model.encoder.conv_in.weight.grad
    assert g is not None and g.abs().sum() > 0


def test_codebook_gradient_is_the_same_every_run_on_several_threads():
    # 16x16 codes of 64 images: the text-to-image quickstart's VQ (16 images an update) was not
    # bit-reproducible while the code lookup's backward summed rows in thread order; 64 images
    # and 8 repeats make the old lookup fail this test reliably (measured), 16 did not
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        q = VectorQuantizer(512, 8, beta=0.25, l2_norm=True)
        z = torch.randn(64, 8, 16, 16)
        upstream = torch.randn(64, 8, 16, 16)
        grads = []
        for _ in range(8):
            q.zero_grad()
            zq, _, losses, _ = q(z)
            ((zq * upstream).sum() + losses["codebook"]).backward()
            grads.append(q.embedding.weight.grad.clone())
        for g in grads[1:]:
            assert torch.equal(g, grads[0])
    finally:
        torch.set_num_threads(threads)


def test_usage_window_and_dead_code_restart():
    q = VectorQuantizer(8, 4, beta=0.25, l2_norm=True)
    for _ in range(5):
        q.track(torch.tensor([3, 0, 1, 0, 0, 0, 0, 0]))
    assert q.window_usage(3) == pytest.approx(2 / 8)
    pool = torch.randn(10, 4)
    before = q.embedding.weight.detach().clone()
    assert q.restart_dead(3, pool, torch.Generator().manual_seed(0)) == 6
    after = q.embedding.weight.detach()
    assert torch.equal(after[[0, 2]], before[[0, 2]])  # live codes untouched
    assert not torch.equal(after[1], before[1])
    assert q.window_usage(3) == 1.0  # restarted codes get a grace period


@pytest.mark.parametrize("local", [False, True])
def test_local_encoder_codes_see_only_their_window(local):
    # ch_mult [1, 1, 2]: 8x8 codes of 32x32 images; the local encoder's code at (1, 1) sees a
    # 21-px window (pixels 0..17 here). Repainting the far corner changes it only through the
    # default encoder's GroupNorm statistics, attention and wide receptive field.
    torch.manual_seed(0)
    model = VQModel(tiny_cfg(ch_mult=[1, 1, 2], local_encoder=local))
    for p in model.parameters():  # random weights everywhere (init zeroes residual branches)
        torch.nn.init.normal_(p, std=0.2)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = x.clone()
    y[..., 24:, 24:] = 1.0
    with torch.no_grad():
        zx, zy = model.encode_latent(x), model.encode_latent(y)
    assert torch.equal(zx[..., 1, 1], zy[..., 1, 1]) == local
    assert not torch.equal(zx[..., 7, 7], zy[..., 7, 7])  # the repainted corner itself changes
    # parameter names stay LlamaGen's wherever the two layouts share a module
    if local:
        own = set(model.state_dict())
        assert "encoder.norm_out.weight" in own
        assert not any(k.startswith("encoder.mid.") for k in own)


def test_encode_decode_shapes():
    model = VQModel(tiny_cfg()).eval()
    assert model.kind == "discrete" and model.downsample == 2 and model.grid(16) == (8, 8)
    codes = model.encode(torch.rand(3, 3, 16, 16) * 2 - 1)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64 and codes.max() < 32
    assert model.decode(codes).shape == (3, 3, 16, 16)


# ---------------------------------------------------------------- weights files

def test_save_load_round_trip(tmp_path):
    torch.manual_seed(1)
    cfg = tiny_cfg()
    model = VQModel(cfg).eval()
    path = save_tokenizer(model, cfg, tmp_path / "vq.safetensors")
    assert (tmp_path / "vq.yaml").is_file()
    loaded = load_tokenizer(path)
    assert isinstance(loaded, VQModel) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert loaded.cfg == cfg
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.decode(model.encode(x)), model.decode(model.encode(x)))


def test_load_errors_name_the_file(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file")
    with pytest.raises(ValueError, match="junk.safetensors"):
        load_tokenizer(junk)
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_tokenizer(tmp_path / "missing.safetensors")
    from common.io import save_weights

    foreign = tmp_path / "gen.safetensors"
    save_weights(foreign, {"w": torch.zeros(2)}, kind="generator", config_yaml="a: 1\n")
    with pytest.raises(ValueError, match="gen.safetensors.*tokenizer"):
        load_tokenizer(foreign)
    unknown = tmp_path / "unknown.safetensors"
    save_weights(unknown, {"w": torch.zeros(2)}, kind="tokenizer", config_yaml="name: magic\n")
    with pytest.raises(ValueError, match="unknown.safetensors.*'magic'"):
        load_tokenizer(unknown)
    cfg = tiny_cfg()
    state = VQModel(cfg).state_dict()
    state.pop("decoder.conv_out.bias")
    from common.config import to_yaml

    broken = tmp_path / "broken.safetensors"
    save_weights(broken, state, kind="tokenizer", config_yaml=to_yaml(cfg))
    with pytest.raises(ValueError, match="broken.safetensors.*decoder.conv_out.bias"):
        load_tokenizer(broken)


# ---------------------------------------------------------------- discriminator

def test_discriminator_and_adaptive_weight():
    d = PatchDiscriminator(ch=8, n_layers=2)
    logits = d(torch.randn(2, 3, 32, 32))
    assert logits.shape[:2] == (2, 1)
    assert hinge_d_loss(torch.full((4,), 2.0), torch.full((4,), -2.0)) == 0
    w = torch.nn.Parameter(torch.ones(3))
    rec, gan = (2 * w).sum(), (0.5 * w).sum()  # grad norms sqrt(12) and sqrt(0.75)
    assert adaptive_weight(rec, gan, w).item() == pytest.approx(4.0, rel=1e-3)


# ---------------------------------------------------------------- training

def make_folder(root: Path, per_class: int = 6, size: int = 16) -> Path:
    """Two classes of flat-coloured squares: easy enough to learn in a few steps."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(["a", "b"]):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.full((size, size, 3), rng.integers(0, 256, 3), np.uint8)
            s = size // 4 + c * 2
            img[s:-s, s:-s] = rng.integers(0, 256, 3)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def train_args(data: Path, out: Path, steps: int, **extra) -> list[str]:
    args = {"data.root": data, "data.resolution": 16, "data.in_memory": "true",
            "model.codebook_size": 16, "model.ch": 32, "model.ch_mult": "[1,2]",
            "model.z_channels": 8, "model.num_res_blocks": 1, "train.batch_size": 4,
            "train.steps": steps, "train.lr": 2e-3, "train.num_workers": 0, "train.log_every": 2,
            "train.ckpt_every": 3, "train.eval_images": 8, "train.restart_dead": 2,
            "out_dir": out, **extra}
    return [f"{k}={v}" for k, v in args.items()]


def test_training_lowers_loss_and_exports(tmp_path):
    from tokenizer.train import main

    data = make_folder(tmp_path / "data")
    first = main(train_args(data, tmp_path / "r0", steps=1))
    summary = main(train_args(data, tmp_path / "r1", steps=40, **{"train.lr": 3e-3}))
    assert summary["psnr"] > first["psnr"] + 2  # about +3 dB in practice
    out = tmp_path / "r1"
    for name in ("vq.safetensors", "vq.yaml", "summary.json", "recon.png", "checkpoint.pt"):
        assert (out / name).is_file(), name
    assert json.loads((out / "summary.json").read_text())["steps"] == 40
    assert list(out.glob("events.out.tfevents*"))
    model = load_tokenizer(out / "vq.safetensors")
    assert model.codebook_size == 16


def test_resume_continues_from_checkpoint(tmp_path):
    """An interrupted run (checkpoint at step 6) resumed to 8 steps equals an 8-step run."""
    from tokenizer.train import main

    data = make_folder(tmp_path / "data")
    main(train_args(data, tmp_path / "full", steps=8))
    main(train_args(data, tmp_path / "cut", steps=6, **{"train.ckpt_every": 6}))
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6
    summary = main(train_args(data, tmp_path / "cut", steps=8))
    assert summary["steps_this_run"] == 2
    a = load_tokenizer(tmp_path / "full" / "vq.safetensors").state_dict()
    b = load_tokenizer(tmp_path / "cut" / "vq.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_gan_path_runs_and_finished_run_is_not_repeated(tmp_path):
    from tokenizer.train import main

    data = make_folder(tmp_path / "data")
    args = train_args(data, tmp_path / "gan", steps=3, **{
        "train.gan": "true", "train.disc_start": 1, "train.disc_ch": 8, "train.disc_layers": 2})
    summary = main(args)
    ckpt = torch.load(tmp_path / "gan" / "checkpoint.pt", weights_only=True)
    assert ckpt["discriminator"] and ckpt["disc_optimizer"]["state"]
    assert main(args) == summary  # a finished run only reports its summary


def test_rfid_is_reported_and_missing_weights_fail_before_training(tmp_path, monkeypatch):
    """rFID of the eval images: against their reference .npz and from the originals directly."""
    from evaluation import make_reference
    from evaluation.weights import ENV_WEIGHTS, cache_dir, CACHE_WEIGHTS
    from tokenizer.train import main

    if not (cache_dir() / CACHE_WEIGHTS).is_file() and not os.environ.get(ENV_WEIGHTS):
        pytest.skip("no Inception weights: run `make inception` (scripts/get_inception.py)")
    data = make_folder(tmp_path / "data", per_class=4)
    make_reference(data, tmp_path / "ref.npz", num_workers=0, progress=False)
    direct = main(train_args(data, tmp_path / "a", steps=2, **{"train.rfid": "true"}))
    via_ref = main(train_args(data, tmp_path / "b", steps=2, **{"train.rfid": "true",
                                                               "train.rfid_ref": tmp_path / "ref.npz"}))
    assert np.isfinite(direct["rfid"]) and direct["rfid"] > 0
    assert via_ref["rfid"] == pytest.approx(direct["rfid"], rel=1e-3)  # same images, same statistics
    monkeypatch.setenv("ARGEN_CACHE", str(tmp_path / "empty"))
    monkeypatch.delenv(ENV_WEIGHTS, raising=False)
    with pytest.raises(Exception, match="Inception weights"):
        main(train_args(data, tmp_path / "c", steps=2, **{"train.rfid": "true"}))
    assert not (tmp_path / "c" / "checkpoint.pt").exists()  # failed before any training


def test_resume_with_other_settings_is_refused_and_rerun_keeps_every_byte(tmp_path):
    from tokenizer.train import main

    from test_train_faults import snapshot

    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    main(train_args(data, out, steps=3))
    before = snapshot(out)
    assert main(train_args(data, out, steps=3))["steps"] == 3  # finished: reported, not redone
    assert snapshot(out) == before
    with pytest.raises(ValueError, match=r"model.codebook_size: checkpoint 16, now 32.*another out_dir="):
        main(train_args(data, out, steps=6, **{"model.codebook_size": 32}))
    with pytest.raises(ValueError, match=r"train.lr: checkpoint 0.002, now 0.01"):
        main(train_args(data, out, steps=6, **{"train.lr": 0.01}))
    assert snapshot(out) == before


def test_bad_tokenizer_settings_are_one_line_errors(tmp_path):
    data = make_folder(tmp_path / "data", per_class=1)
    for extra, key in ((("train.ckpt_every=0",), "train.ckpt_every=0"),
                       (("data.root=/nowhere/images",), "data.root=/nowhere/images not found")):
        args = train_args(data, tmp_path / "r", steps=2) + list(extra)
        proc = subprocess.run([sys.executable, "-m", "tokenizer.train", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert lines[-1].startswith("error: ") and key in lines[-1]
    assert not (tmp_path / "r").exists()
