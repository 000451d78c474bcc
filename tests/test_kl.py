"""KL tokenizer: MAR KL-16 parity (shared/fixtures/mar_vae), the converter's key table against the
released KL-16 layout, diffusers folders, weights round trip, KL training and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import ConfigError
from convert.mar_vae import MarVAEConvertConfig, convert, infer_config, key_table, main as convert_main
from tokenizer import load_tokenizer, save_tokenizer, tokenizer_sha256
from tokenizer.kl import KLConfig, KLModel
from tokenizer.kl_loss import kl_divergence, split_moments, step_noise

MAR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "mar_vae"
needs_fixtures = pytest.mark.skipif(
    not (MAR / "mar_vae_tiny.pt").is_file(),
    reason=f"MAR VAE fixtures not found at {MAR} (they sit beside the project in shared/)")


def tiny_cfg(**kw) -> KLConfig:
    base = dict(block_out_channels=[32, 32], layers_per_block=1, latent_channels=4,
                encoder_attention=[], latent_scale=0.5)
    return KLConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def mar(tmp_path_factory):
    """The converted fixture VAE and the reference outputs of MAR's code."""
    out = tmp_path_factory.mktemp("mar") / "kl.safetensors"
    convert(MarVAEConvertConfig(ckpt=str(MAR / "mar_vae_tiny.pt"), out=str(out)))
    return load_tokenizer(out), load_file(str(MAR / "mar_vae_tiny_reference.safetensors")), out


# ---------------------------------------------------------------- MAR parity

@needs_fixtures
def test_posterior_matches_mar(mar):
    model, ref, _ = mar
    moments = model.moments(ref["vae_images"])
    mean, logvar = split_moments(moments)
    errors = {name: (a - ref[key]).abs().max().item() for name, a, key in
              (("moments", moments, "vae_moments"), ("mean", mean, "vae_mean"),
               ("logvar", logvar, "vae_logvar"))}
    print(f"MAR parity, max abs error: {errors}")
    assert mean.shape == (2, 16, 16, 16) and all(e < 1e-5 for e in errors.values())
    drawn = mean + torch.exp(0.5 * logvar) * ref["vae_sample_noise"]
    torch.testing.assert_close(drawn, ref["vae_sample"], atol=1e-5, rtol=0)


@needs_fixtures
def test_decode_takes_scaled_latents_and_matches_mar(mar):
    model, ref, _ = mar
    assert model.cfg.latent_scale == 0.2325 and model.kind == "continuous"
    decoded = model.decode(ref["vae_mean"] * 0.2325)
    error = (decoded - ref["vae_decoded_from_mean"]).abs().max().item()
    print(f"MAR decode, max abs error: {error:.3g}")
    assert error < 5e-5
    torch.testing.assert_close(model.encode(ref["vae_images"]), ref["vae_mean"] * 0.2325,
                               atol=1e-5, rtol=0)


@needs_fixtures
def test_key_table_covers_the_released_kl16_exactly():
    manifest = json.loads((MAR / "mar_vae_manifest.json").read_text())["manifests"]["kl16"]
    shapes = {k: tuple(v) for k, v in manifest["state_dict"]}
    cfg = infer_config(shapes, "kl16")
    c = manifest["config"]
    assert cfg.block_out_channels == [c["ch"] * m for m in c["ch_mult"]]
    assert (cfg.latent_channels, cfg.layers_per_block, cfg.encoder_attention) == (16, 2, [4])
    assert cfg == KLConfig()  # argen's KL defaults are MAR's KL-16
    table = key_table(cfg)
    assert set(table) == set(shapes) and len(set(table.values())) == len(table) == 312
    with torch.device("meta"):
        model = KLModel(cfg)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(table.values()) == set(own)
    for mar_key, key in table.items():  # 1x1 attention convs become Linear weights
        want = shapes[mar_key][:2] if len(own[key]) == 2 else shapes[mar_key]
        assert own[key] == want, mar_key
    assert sum(p.numel() for p in model.parameters()) == manifest["n_parameters"]


@needs_fixtures
def test_converter_cli_and_bad_checkpoints(tmp_path):
    out = convert_main([str(MAR / "mar_vae_tiny.pt"), str(tmp_path / "a.safetensors")])
    assert load_tokenizer(out).cfg.block_out_channels == [32, 64]
    state = torch.load(MAR / "mar_vae_tiny.pt", weights_only=True)["model"]
    vq = {"encoder.conv_in.weight": torch.zeros(1), "quantize.embedding.weight": torch.zeros(4, 2)}
    torch.save({"model": vq}, tmp_path / "vq.pt")
    with pytest.raises(SystemExit, match=r"vq.pt: this is a VQ tokenizer checkpoint.*convert.llamagen"):
        convert_main([str(tmp_path / "vq.pt"), str(tmp_path / "b.safetensors")])
    extra = dict(state, **{"encoder.down.0.block.0.extra.weight": torch.zeros(1)})
    torch.save({"model": extra}, tmp_path / "extra.pt")
    with pytest.raises(SystemExit, match=r"extra.pt: 1 keys .* not know.*block.0.extra.weight"):
        convert_main([str(tmp_path / "extra.pt"), str(tmp_path / "c.safetensors")])
    state.pop("decoder.up.1.upsample.conv.bias")
    torch.save({"model": state}, tmp_path / "short.pt")
    with pytest.raises(SystemExit, match=r"1 missing keys: \['decoder.up.1.upsample.conv.bias'\]"):
        convert_main([str(tmp_path / "short.pt"), str(tmp_path / "d.safetensors")])


# ---------------------------------------------------------------- model and weights

def test_encode_decode_scale_and_round_trip(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg(latent_shift=0.1)
    model = KLModel(cfg).eval()
    assert model.downsample == 2 and model.grid(16) == (8, 8) and model.latent_channels == 4
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mean, logvar = model.posterior(x)
    torch.testing.assert_close(model.encode(x), (mean - 0.1) * 0.5)
    torch.testing.assert_close(model.decode(model.encode(x)), model.decode_raw(mean), atol=1e-5, rtol=0)
    loaded = load_tokenizer(save_tokenizer(model, cfg, tmp_path / "kl.safetensors"))
    assert isinstance(loaded, KLModel) and loaded.cfg == cfg
    assert torch.equal(loaded.moments(x), model.moments(x).detach())
    with pytest.raises(ValueError, match="latent_scale 0"):
        KLModel(tiny_cfg(latent_scale=0.0)).encode(x)


def test_kl_term_and_step_noise():
    mean, logvar = torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    assert kl_divergence(mean, logvar) == 0  # the prior itself
    # per element 0.5 * (m^2 + e^lv - 1 - lv); summed over 36 elements, averaged over 2 images
    assert kl_divergence(mean + 1, logvar).item() == pytest.approx(0.5 * 36)
    assert torch.equal(step_noise((4, 2), 0, 7), step_noise((4, 2), 0, 7))
    assert not torch.equal(step_noise((4, 2), 0, 7), step_noise((4, 2), 0, 8))


def test_config_range_checks():
    for kw, match in ((dict(block_out_channels=[32, 48]), "multiple of model.norm_num_groups"),
                      (dict(encoder_attention=[2]), "levels \\[2\\] do not exist"),
                      (dict(latent_scale=-1.0), "latent_scale=-1.0 is out of range")):
        with pytest.raises(ConfigError, match=match):
            tiny_cfg(**kw).validate()


# ---------------------------------------------------------------- diffusers folders

def test_diffusers_folder_loads_with_its_scaling_factor(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
                        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
                        block_out_channels=[32, 32], layers_per_block=1, latent_channels=4,
                        scaling_factor=0.3, shift_factor=0.05).eval()
    vae.save_pretrained(tmp_path / "vae")
    model = load_tokenizer(tmp_path / "vae")
    assert (model.cfg.latent_scale, model.cfg.latent_shift, model.cfg.encoder_attention) == (0.3, 0.05, [1])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        z = posterior.mean
        assert torch.equal(model.moments(x), posterior.parameters)
        torch.testing.assert_close(model.encode(x), (z - 0.05) * 0.3)
        torch.testing.assert_close(model.decode(model.encode(x)), vae.decode(z).sample,
                                   atol=1e-5, rtol=0)
    assert len(tokenizer_sha256(tmp_path / "vae")) == 64


def test_diffusers_folder_with_pre_0_14_attention_names(tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    AutoencoderKL(block_out_channels=[32], layers_per_block=1, latent_channels=4).save_pretrained(tmp_path)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    new = load_file(str(path))
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for k, v in new.items():
        for a, b in old_names.items():
            k = k.replace(f".{a}.", f".{b}.")
        old[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old
    save_file(old, str(path))
    model = load_tokenizer(tmp_path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in new.items())


def test_a_folder_that_is_not_a_kl_autoencoder_is_named(tmp_path):
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ValueError, match=r"unet: not a KL autoencoder: .*_class_name: UNet2DConditionModel"):
        load_tokenizer(unet)
    pipe = tmp_path / "pipe"
    (pipe / "vae").mkdir(parents=True)
    (pipe / "vae" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"pipe has no config.json.*pass .*pipe/vae"):
        load_tokenizer(pipe)
    bad = dict(_class_name="AutoencoderKL", block_out_channels=[32], latents_mean=[0.0] * 4,
               down_block_types=["DownEncoderBlock2D"], up_block_types=["UpDecoderBlock2D"])
    (unet / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="does not support: {'latents_mean'"):
        load_tokenizer(unet)


# ---------------------------------------------------------------- training

def test_quickstart_config_matches_the_vq_quickstart_grid():
    from common.config import load_config
    from conftest import ROOT
    from tokenizer.train_config import KLTokenizerTrainConfig, TokenizerTrainConfig, schema_for

    path = ROOT / "configs" / "tokenizer" / "kl_quickstart.yaml"
    assert schema_for(["--config", str(path)]) is KLTokenizerTrainConfig
    assert schema_for(["--config", str(path), "model.name=vq"]) is TokenizerTrainConfig
    kl = load_config(KLTokenizerTrainConfig, [path])
    vq = load_config(TokenizerTrainConfig, [ROOT / "configs" / "tokenizer" / "quickstart.yaml"])
    with torch.device("meta"):
        kl_grid = KLModel(kl.model).grid(kl.data.resolution)
    assert kl_grid == (8, 8) == (vq.data.resolution // 2 ** (len(vq.model.ch_mult) - 1),) * 2
    assert kl.model.latent_channels == 16 and kl.model.latent_scale == 0  # measured when trained


def kl_args(data: Path, out: Path, steps: int, **extra) -> list[str]:
    args = {"data.root": data, "data.resolution": 16, "data.in_memory": "true", "model.name": "kl",
            "model.block_out_channels": "[32,32]", "model.layers_per_block": 1,
            "model.latent_channels": 4, "model.encoder_attention": "[]", "model.latent_scale": 0,
            "train.batch_size": 4, "train.steps": steps, "train.lr": 2e-3, "train.num_workers": 0,
            "train.log_every": 2, "train.ckpt_every": 3, "train.eval_images": 8, "out_dir": out,
            **extra}
    return [f"{k}={v}" for k, v in args.items()]


def test_kl_training_exports_with_measured_scale_and_resumes_exactly(tmp_path):
    """A run cut at step 3 and resumed to 5 equals an uninterrupted 5-step run."""
    from test_tokenizer import make_folder
    from tokenizer.train import main

    data = make_folder(tmp_path / "data")
    full = main(kl_args(data, tmp_path / "full", steps=5))
    for key in ("psnr", "latent_mean", "latent_std", "latent_sample_std", "latent_scale"):
        assert isinstance(full[key], float), key
    assert full["latent_scale"] == pytest.approx(1 / full["latent_sample_std"], rel=1e-3)
    assert json.loads((tmp_path / "full" / "summary.json").read_text()) == full
    assert list((tmp_path / "full").glob("events.out.tfevents*"))
    model = load_tokenizer(tmp_path / "full" / "kl.safetensors")
    assert model.cfg.latent_scale == full["latent_scale"] > 0
    main(kl_args(data, tmp_path / "cut", steps=3))
    resumed = main(kl_args(data, tmp_path / "cut", steps=5))
    assert resumed["steps_this_run"] == 2
    b = load_tokenizer(tmp_path / "cut" / "kl.safetensors").state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, b[k], atol=1e-5, rtol=1e-4, msg=k)
    with pytest.raises(ValueError, match=r"train.kl_weight: checkpoint 1e-06, now 0.1"):
        main(kl_args(data, tmp_path / "cut", steps=6, **{"train.kl_weight": 0.1}))


def test_kl_training_with_gan_and_fixed_scale(tmp_path):
    from test_tokenizer import make_folder
    from tokenizer.train import main

    data = make_folder(tmp_path / "data", per_class=2)
    summary = main(kl_args(data, tmp_path / "gan", steps=2, **{
        "model.latent_scale": 0.25, "train.gan": "true", "train.disc_start": 1,
        "train.disc_ch": 8, "train.disc_layers": 2, "train.kl_weight": 1e-3}))
    assert summary["latent_scale"] == 0.25 and summary["kl_weight"] == 1e-3
    ckpt = torch.load(tmp_path / "gan" / "checkpoint.pt", weights_only=True)
    assert ckpt["discriminator"] and ckpt["usage"] == {}
