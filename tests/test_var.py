"""convert.var and the multi-scale VQ tokenizer: VAR's VQVAE converted from the released layout,
checked against outputs of the original code (shared/fixtures/var): the quantised feature,
indices of every scale, cumulative features, images decoded from indices and VAR's teacher-
forcing inputs; the key table against the released vae_ch160v4096z32.pth; the phi choice per
scale; the weights round trip and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ar.conditioning import ClassCondition
from ar.config import BackboneConfig, transformer_args
from ar.transformer import Transformer
from common.config import ConfigError
from conftest import FIXTURES, cached_logits, model_config, tiny_model
from convert.var import main
from convert.var_vqvae import VQVAEConvertConfig, convert_vqvae, infer_vqvae_config, vqvae_key_table
from sampling.generate import generate
from sampling.settings import SamplingConfig
from tokenizer import load_tokenizer, save_tokenizer
from tokenizer.msvq import MSVQConfig, MSVQModel, phi_indices, phi_ticks

VAR = FIXTURES.parent / "var"
VQVAE = VAR / "var_vqvae_tiny.pth"
SCALES = "patch_nums=[1,2,3,4]"
needs_fixtures = pytest.mark.skipif(not VQVAE.is_file(), reason=f"VAR fixtures not found at {VAR} "
                                                                f"(they sit beside the project in shared/)")


@pytest.fixture(scope="module")
def ref():
    return load_file(str(VAR / "var_tiny_reference.safetensors"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("var") / "vqvae.safetensors"
    return convert_vqvae(VQVAEConvertConfig(ckpt=str(VQVAE), out=str(out), patch_nums=[1, 2, 3, 4]))


@pytest.fixture(scope="module")
def vqvae(converted):
    return load_tokenizer(converted)


def manifest(name: str) -> dict:
    return json.loads((VAR / "var_manifest.json").read_text())["manifests"][name]


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------- parity

@needs_fixtures
def test_features_indices_and_f_hat_match_var(vqvae, ref):
    images = ref["vqvae_images"]
    with torch.no_grad():
        f = vqvae.features(images)
    indices = vqvae.encode_scales(images)
    f_hats = torch.stack(vqvae.f_hats(indices))
    errors = {"f": max_err(f, ref["vqvae_f"]), "f_hat": max_err(f_hats, ref["vqvae_f_hat_per_scale"])}
    print(f"VAR VQVAE parity, max abs error: {errors}")
    assert all(e < 1e-5 for e in errors.values())
    for k, idx in enumerate(indices):
        assert torch.equal(idx, ref[f"vqvae_idx_s{k}"]), f"scale {k}"
    assert torch.equal(vqvae.encode(images), torch.cat(indices, 1))
    assert max_err(f_hats[-1], ref["vqvae_f_hat"]) < 1e-5


@needs_fixtures
def test_images_decoded_from_indices_match_var(vqvae, ref):
    indices = [ref[f"vqvae_idx_s{k}"] for k in range(4)]
    error = max_err(vqvae.decode_indices(indices), ref["vqvae_decoded_from_idx"])
    print(f"VAR decode from indices, max abs error: {error:.3g}")
    assert error < 1e-4
    assert torch.equal(vqvae.decode(torch.cat(indices, 1)), vqvae.decode_indices(indices))


@needs_fixtures
def test_teacher_forcing_inputs_match_var(vqvae, ref):
    inputs = vqvae.next_scale_inputs(vqvae.split(ref["var_tf_idx_BL"]))
    assert inputs.shape == (3, 29, 8)
    error = max_err(inputs, ref["var_tf_input"])
    print(f"VAR teacher-forcing input, max abs error: {error:.3g}")
    assert error < 1e-5


# ------------------------------------------------------------------------- the release's layout

@needs_fixtures
def test_key_table_covers_the_released_vqvae_exactly():
    shapes = {k: tuple(v) for k, v in manifest("vae_ch160v4096z32.pth").items()}
    cfg = infer_vqvae_config(shapes, "vae_ch160v4096z32.pth")
    assert cfg == MSVQConfig()  # argen's defaults are the release's VQVAE
    table = vqvae_key_table(cfg)
    assert set(table) == set(shapes) - {"quantize.ema_vocab_hit_SV"}
    assert len(set(table.values())) == len(table) == 323
    with torch.device("meta"):
        model = MSVQModel(cfg)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(own) == set(table.values())
    assert all(own[table[k]] == shapes[k] for k in table)
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == sum(math.prod(shapes[k]) for k in table) == 108_948_355
    assert model.downsample == 16 and model.grid(256) == (16, 16) and model.seq_len == 680
    assert model.quantize.phi_of_scale == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


@needs_fixtures
def test_tiny_fixture_architecture_is_read_from_its_shapes(vqvae):
    cfg = vqvae.cfg
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks) == (32, [1, 1, 2, 2, 4], 2)
    assert (cfg.codebook_size, cfg.codebook_dim, cfg.share_quant_resi) == (64, 8, 4)
    assert vqvae.kind == "multiscale" and vqvae.codebook_size == 64 and vqvae.grid(64) == (4, 4)
    with pytest.raises(ValueError, match=r"schedule \[1, 2, 3, 4\] ends at 4: use 64 px"):
        vqvae.grid(128)


def test_phi_index_per_scale_follows_var_float_rounding():
    stored = json.loads((VAR / "var_manifest.json").read_text())["config"] if VAR.is_dir() else None
    assert phi_indices(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]  # 2/9 and 7/9 are ties, decided by rounding
    assert phi_indices(4, 4) == [0, 1, 2, 3]
    assert phi_indices(10, 1) == [0] * 10
    assert phi_indices(3, 3) == [0, 1, 2]  # share_quant_resi 0: one per scale
    if stored:
        assert phi_ticks(4).tolist() == stored["vqvae"]["phi_ticks"]
        assert phi_indices(4, 4) == stored["vqvae"]["phi_index_per_scale"]


# ------------------------------------------------------------------------- weights and bad input

def tiny_cfg(**kw) -> MSVQConfig:
    base = dict(codebook_size=16, codebook_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                patch_nums=[1, 2, 4])
    return MSVQConfig(**{**base, **kw})


@pytest.mark.parametrize("share", [0, 1, 2])
def test_save_load_round_trip_and_shapes(tmp_path, share):
    torch.manual_seed(0)
    cfg = tiny_cfg(share_quant_resi=share)
    model = MSVQModel(cfg).eval()
    assert len(model.quantize.phi) == {0: 3, 1: 1, 2: 2}[share]
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    codes = model.encode(x)
    assert codes.shape == (2, 1 + 4 + 16) and codes.dtype == torch.int64
    assert model.next_scale_inputs(model.split(codes)).shape == (2, 20, 4)
    loaded = load_tokenizer(save_tokenizer(model, cfg, tmp_path / "msvq.safetensors"))
    assert isinstance(loaded, MSVQModel) and loaded.cfg == cfg
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    assert loaded.decode(codes).abs().max() <= 1
    with pytest.raises(ValueError, match=r"needs \(B, 21\)"):
        model.decode(codes[:, :20])


def test_config_range_checks():
    for kw, match in ((dict(ch=48), "multiple of 32"), (dict(patch_nums=[1, 3, 2]), "strictly increasing"),
                      (dict(quant_resi=1.5), "quant_resi=1.5 is out of range")):
        with pytest.raises(ConfigError, match=match):
            tiny_cfg(**kw).validate()


@needs_fixtures
def test_cli_and_bad_checkpoints(tmp_path, vqvae):
    out = main(["vqvae", str(VQVAE), str(tmp_path / "a.safetensors"), SCALES])
    assert load_tokenizer(out).cfg == vqvae.cfg
    with pytest.raises(SystemExit, match=r"trained with 4 scales .* pass patch_nums= with 4"):
        main(["vqvae", str(VQVAE), str(tmp_path / "b.safetensors")])  # the release's 10 scales
    with pytest.raises(SystemExit, match="first argument must be one of"):
        main(["gpt", str(VQVAE)])
    llamagen = FIXTURES / "llamagen_vq_tiny.pt"
    if llamagen.is_file():
        with pytest.raises(SystemExit, match=r"not a VAR VQVAE state dict.*LlamaGen VQ.*convert.llamagen vq"):
            main(["vqvae", str(llamagen), str(tmp_path / "c.safetensors")])
    state = torch.load(VQVAE, weights_only=True)
    torch.save(dict(state, **{"encoder.down.0.block.0.extra.weight": torch.zeros(1)}), tmp_path / "x.pth")
    with pytest.raises(SystemExit, match=r"1 keys the VAR VQVAE key table does not know.*extra.weight"):
        main(["vqvae", str(tmp_path / "x.pth"), str(tmp_path / "d.safetensors"), SCALES])
    state.pop("decoder.up.1.upsample.conv.bias")
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(SystemExit, match=r"1 missing keys: \['decoder.up.1.upsample.conv.bias'\]"):
        main(["vqvae", str(tmp_path / "short.pth"), str(tmp_path / "e.safetensors"), SCALES])


# ------------------------------------------------------------------------- VAR's block

VAR_BLOCK = BackboneConfig(norm_eps=1e-6, block_norm="layer", block_norm_affine=False, ffn="mlp",
                           ffn_gate="gelu_tanh", ffn_hidden=512, bias=True, k_bias=False, qk_norm=True,
                           adaln=True, final_adaln=True)


@pytest.mark.skipif(not (VAR / "var_tiny.pth").is_file(), reason=f"no VAR fixtures at {VAR}")
def test_backbone_switches_reproduce_var_teacher_forced_logits():
    """VAR's block as configuration of the one block (LayerNorm without affine, GELU-tanh MLP,
    q/v bias, l2-normalised attention with the per-head scale clamped at 100, six-way adaLN,
    adaLN before the head). The embeddings are assembled by hand here (the scale order and its
    inputs on ARModel come next); the logits match VAR's within 2e-5."""
    sd = torch.load(VAR / "var_tiny.pth", weights_only=True)
    ref = load_file(str(VAR / "var_tiny_reference.safetensors"))
    cfg = model_config(dim=128, n_layer=2, n_head=2, backbone=VAR_BLOCK, token_dropout=0.0,
                      resid_dropout=0.0, ffn_dropout=0.0)
    net = Transformer(transformer_args(cfg)).eval()
    state = {"final_modulation.1.weight": sd["head_nm.ada_lin.1.weight"],
             "final_modulation.1.bias": sd["head_nm.ada_lin.1.bias"]}
    for i in range(2):
        b, layer = f"blocks.{i}.", f"layers.{i}."
        state.update({
            layer + "attention.wqkv.weight": sd[b + "attn.mat_qkv.weight"],
            layer + "attention.wqkv.bias": torch.cat([sd[b + "attn.q_bias"], sd[b + "attn.zero_k_bias"],
                                                      sd[b + "attn.v_bias"]]),
            layer + "attention.scale_log": sd[b + "attn.scale_mul_1H11"].flatten(),
            layer + "attention.wo.weight": sd[b + "attn.proj.weight"],
            layer + "attention.wo.bias": sd[b + "attn.proj.bias"],
            **{layer + f"feed_forward.{ours}.{p}": sd[b + f"ffn.{theirs}.{p}"]
               for ours, theirs in (("w1", "fc1"), ("w2", "fc2")) for p in ("weight", "bias")},
            **{layer + f"modulation.1.{p}": sd[b + f"ada_lin.1.{p}"] for p in ("weight", "bias")}})
    net.load_state_dict(state, strict=True)
    cond = sd["class_emb.weight"][ref["var_tf_labels"]][:, None]  # (B, 1, C): start token and adaLN
    words = torch.nn.functional.linear(ref["var_tf_input"], sd["word_embed.weight"], sd["word_embed.bias"])
    x = torch.cat([cond + sd["pos_start"], words], dim=1) + sd["lvl_embed.weight"][sd["lvl_1L"][0]] + sd["pos_1LC"][0]
    no_rotation = torch.stack([torch.ones(30, 32), torch.zeros(30, 32)], dim=-1)  # VAR has no RoPE
    with torch.no_grad():
        h = net(x, no_rotation, sd["attn_bias_for_masking"][0, 0] == 0, ada=(cond, None))
    logits = torch.nn.functional.linear(h, sd["head.weight"], sd["head.bias"])
    assert (logits - ref["var_tf_logits"]).abs().max().item() < 2e-5


@pytest.mark.parametrize("order", [dict(order="cell", cell=2), dict(order="raster")], ids=["cell2", "raster"])
def test_var_block_cached_decoding_equals_full_forward(order):
    """The KV cache stores the l2-normalised keys: step-by-step logits equal the full pass."""
    model = tiny_model(backbone=VAR_BLOCK, **order)
    for p in model.parameters():  # away from adaLN-zero, so modulation and scales matter
        torch.nn.init.normal_(p, std=0.3)
    seq = torch.randint(0, 32, (3, 16))
    cond = ClassCondition(torch.tensor([0, 2, 1]))
    with torch.no_grad():
        full = model.head.logits(model.hidden(seq, cond))
    assert torch.allclose(cached_logits(model, seq, cond), full, atol=1e-4)
    settings = SamplingConfig(cfg_scale=2.0, temperature=0.0)  # the sampling loop passes the vector too
    grid = generate(model, cond, torch.arange(3), 0, settings)
    assert grid.shape == (3, 4, 4) and int(grid.max()) < 32


def test_final_adaln_needs_adaln():
    with pytest.raises(ConfigError, match="final_adaln"):
        BackboneConfig(final_adaln=True).validate()
