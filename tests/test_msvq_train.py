"""Training the multi-scale residual VQ (VAR's VQVAE) with tokenizer.train: VAR's training
quantiser (losses, straight-through, float32 under autocast), usage per scale and dead-code
restarts, exact resume, the exported weights, and the resolution that does not fit the schedule."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.config import ConfigError, load_config
from conftest import ROOT, make_image_folder
from tokenizer import load_tokenizer
from tokenizer.msvq import MSVQConfig, MSVQModel

PATCH_NUMS = [1, 2, 4]  # 8 px images, one downsampling: a 4x4 latent


def tiny_cfg(**kw) -> MSVQConfig:
    base = dict(codebook_size=16, codebook_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                patch_nums=PATCH_NUMS, share_quant_resi=0)  # one phi per scale: every conv is used
    return MSVQConfig(**{**base, **kw})


def train_args(data: Path, out: Path, steps: int, **extra) -> list[str]:
    args = {"model.name": "msvq", "data.root": data, "data.resolution": 8, "data.in_memory": "true",
            "model.codebook_size": 16, "model.codebook_dim": 4, "model.ch": 32,
            "model.ch_mult": "[1,2]", "model.num_res_blocks": 1, "model.patch_nums": "[1,2,4]",
            "model.share_quant_resi": 0, "train.batch_size": 4, "train.steps": steps,
            "train.lr": 3e-3, "train.num_workers": 0, "train.log_every": 2, "train.ckpt_every": 3,
            "train.eval_images": 8, "train.restart_dead": 2, "out_dir": out, **extra}
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("msvq") / "data", 8)


# ---------------------------------------------------------------- the training quantiser

def test_training_forward_picks_the_inference_codes_with_vars_losses():
    torch.manual_seed(0)
    model = MSVQModel(tiny_cfg())
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    recon, losses, stats = model(x)
    f = model.features(x).detach()
    indices, f_hats = model.quantize.quantize(f)
    assert torch.equal(stats["counts"], torch.stack([torch.bincount(i.flatten(), minlength=16)
                                                     for i in indices]))  # (S, V)
    assert stats["counts"].shape == (3, 16) and stats["usage_per_scale"].shape == (3,)
    assert len(stats["latents"]) == 3 * sum(pn * pn for pn in PATCH_NUMS)
    mse = torch.stack([F.mse_loss(h, f) for h in f_hats]).mean()  # VAR: mean over scales
    torch.testing.assert_close(losses["codebook"], mse)
    torch.testing.assert_close(losses["commit"], 0.25 * mse)
    with torch.no_grad():  # the straight-through value is f_hat: recon = decode of the codes, unclamped
        torch.testing.assert_close(recon, model.decoder(model.post_quant_conv(f_hats[-1])), atol=1e-5, rtol=0)


def grad_sum(params) -> float:
    return sum(p.grad.abs().sum().item() for p in params if p.grad is not None)


def grads(model: MSVQModel, loss: torch.Tensor) -> dict:
    """How much gradient `loss` sends to each part (0: none)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    q = model.quantize
    return {"encoder": grad_sum(model.encoder.parameters()), "codebook": grad_sum([q.embedding.weight]),
            "phi": [grad_sum(c.parameters()) for c in q.phi], "decoder": grad_sum(model.decoder.parameters())}


def test_gradients_straight_through_to_the_encoder_and_codebook_terms_to_codes_and_phi():
    torch.manual_seed(0)
    model = MSVQModel(tiny_cfg())
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    rec = grads(model, model(x)[0].pow(2).mean())  # the reconstruction alone: only the ST path
    assert rec["encoder"] > 0 and rec["decoder"] > 0 and rec["codebook"] == 0
    code = grads(model, model(x)[1]["codebook"])
    assert code["codebook"] > 0 and all(g > 0 for g in code["phi"]) and code["encoder"] == 0
    commit = grads(model, model(x)[1]["commit"])
    assert commit["encoder"] > 0 and commit["codebook"] == 0 and commit["phi"] == [0, 0, 0]


def test_quantiser_stays_float32_under_bf16_autocast():
    torch.manual_seed(0)
    q = MSVQModel(tiny_cfg()).quantize
    f = torch.randn(2, 4, 4, 4)
    plain = q(f)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = q(f)
    assert mixed[0].dtype == torch.float32 and mixed[1]["codebook"].dtype == torch.float32
    assert torch.equal(plain[0], mixed[0]) and torch.equal(plain[2]["counts"], mixed[2]["counts"])


def test_usage_window_per_scale_and_restart_only_codes_dead_at_every_scale():
    q = MSVQModel(tiny_cfg(codebook_size=8)).quantize
    counts = torch.zeros(3, 8, dtype=torch.long)
    counts[0, 0] = counts[2, 5] = 1  # code 0 used at the coarsest scale only, code 5 at the finest
    for _ in range(4):
        q.track(counts)
    assert q.window_usage(3) == pytest.approx(2 / 8)
    assert q.seen(3).float().mean(1).tolist() == [1 / 8, 0, 1 / 8]
    before = q.embedding.weight.detach().clone()
    pool = torch.randn(10, 4)
    assert q.restart_dead(3, pool, torch.Generator().manual_seed(0)) == 6
    after = q.embedding.weight.detach()
    assert torch.equal(after[[0, 5]], before[[0, 5]])  # live at one scale: not restarted
    assert all(any(torch.equal(after[k], p) for p in pool) for k in (1, 2, 3, 4, 6, 7))  # unnormalised
    assert q.window_usage(3) == 1.0  # restarted codes get a grace period
    assert not any("last_used" in k or "track_step" in k for k in MSVQModel(tiny_cfg()).state_dict())


# ---------------------------------------------------------------- tokenizer.train

def test_training_improves_recon_and_reports_usage_per_scale(tmp_path, data):
    from tokenizer.train import main

    first = main(train_args(data, tmp_path / "r0", steps=1))
    summary = main(train_args(data, tmp_path / "r1", steps=30))
    assert summary["psnr"] > first["psnr"] + 2
    assert json.loads((tmp_path / "r1" / "summary.json").read_text()) == summary
    assert summary["patch_nums"] == PATCH_NUMS
    for key in ("usage_per_scale", "usage_window_per_scale"):
        assert len(summary[key]) == len(PATCH_NUMS) and all(0 < u <= 1 for u in summary[key]), key
    assert summary["usage_per_scale"][0] <= 8 / 16  # scale 0: one code per eval image (8) at most
    assert list((tmp_path / "r1").glob("events.out.tfevents*")) and (tmp_path / "r1" / "recon.png").is_file()
    model = load_tokenizer(tmp_path / "r1" / "msvq.safetensors")
    assert isinstance(model, MSVQModel) and model.cfg.patch_nums == PATCH_NUMS
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (2, 21) and model.decode(codes).shape == (2, 3, 8, 8)
    assert model.decode(codes).abs().max() <= 1


def test_a_killed_run_resumes_to_the_uninterrupted_weights(tmp_path, data):
    """Cut at step 6 (its checkpoint), then the full 8-step command: the same weights as one run,
    dead-code restarts (seeded by step) and usage per scale included."""
    from tokenizer.train import main

    full = main(train_args(data, tmp_path / "full", steps=8))
    main(train_args(data, tmp_path / "cut", steps=6, **{"train.ckpt_every": 6}))
    ckpt = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 6 and ckpt["usage"]["last_used"].shape == (3, 16)
    resumed = main(train_args(data, tmp_path / "cut", steps=8))
    assert resumed["steps_this_run"] == 2
    assert resumed["usage_window_per_scale"] == full["usage_window_per_scale"]
    a = load_tokenizer(tmp_path / "full" / "msvq.safetensors").state_dict()
    b = load_tokenizer(tmp_path / "cut" / "msvq.safetensors").state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)
    with pytest.raises(ValueError, match=r"train.restart_dead: checkpoint 2, now 5"):
        main(train_args(data, tmp_path / "cut", steps=10, **{"train.restart_dead": 5}))


def test_a_resolution_that_does_not_fit_the_schedule_is_named_before_training(tmp_path, data):
    from tokenizer.train import main

    with pytest.raises(ConfigError, match=r"data.resolution=16 does not fit model.patch_nums=\[1, 2, 4\]"
                                          r".*use 8 px images"):
        main(train_args(data, tmp_path / "r", steps=2, **{"data.resolution": 16}))
    proc = subprocess.run([sys.executable, "-m", "tokenizer.train",
                           *train_args(data, tmp_path / "r", steps=2, **{"model.patch_nums": "[1,2,3]"})],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("error: data.resolution=8 does not fit model.patch_nums=[1, 2, 3]")
    assert not (tmp_path / "r").exists()


def test_quickstart_config_selects_the_msvq_schema_and_fits_its_resolution():
    from tokenizer.train_config import MSVQTokenizerTrainConfig, schema_for

    path = ROOT / "configs" / "tokenizer" / "msvq_quickstart.yaml"
    assert schema_for(["--config", str(path)]) is MSVQTokenizerTrainConfig
    cfg = load_config(MSVQTokenizerTrainConfig, [path])
    with torch.device("meta"):
        model = MSVQModel(cfg.model)
    assert model.grid(cfg.data.resolution) == (8, 8) and model.seq_len == 85
    assert sorted(set(model.quantize.phi_of_scale)) == list(range(len(model.quantize.phi)))  # DDP: all used


def test_local_encoder_features_see_a_fixed_window_only():
    """model.local_encoder: a change in one corner leaves the features of the far corner as
    they were (VAR's encoder, with GroupNorm and attention, carries it everywhere)."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = x.clone()
    y[..., :8, :8] = -y[..., :8, :8]
    for local in (True, False):
        model = MSVQModel(tiny_cfg(ch_mult=[1, 1, 2], patch_nums=[1, 2, 8], local_encoder=local)).eval()
        with torch.no_grad():
            far = (model.features(x) - model.features(y))[..., -2:, -2:].abs().max().item()
        assert (far == 0) == local, (local, far)
        assert any(k.startswith("encoder.mid.") for k in model.state_dict()) != local
