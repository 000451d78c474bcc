"""Next-scale prediction (VAR) on the one model: `convert.var var` reproduces the released
code's teacher-forced logits and its generations at cfg 0, 1 and 4 (shared/fixtures/var); the
key tables of the released d16-d30; the scale order's KV cache; the per-scale code cache; and
the bad input a user can give (a schedule the tokenizer was not trained for, a checkpoint of
another depth, a per-scale cache with a single-grid model)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ar.checkpoint import load_generator
from ar.conditioning import ClassCondition
from ar.data import ScaleCodeCache, open_cache
from ar.config import GeneratorSpec, MultiScaleSpec
from ar.model import ARModel
from ar.orders import ScaleOrder
from common.config import ConfigError
from conftest import FIXTURES, cached_logits, make_image_folder, model_config
from convert.var import main
from convert.var_transformer import (VAR_DERIVED, VAR_KEYS, infer_var_spec, merge_var_tensors,
                                     var_model_config)
from convert.common import rename
from sampling.generate import generate
from sampling.settings import SamplingConfig
from sampling.guidance import scale_at
from tokenizer import load_tokenizer, save_tokenizer
from tokenizer.encode import main as encode
from tokenizer.msvq import MSVQConfig, MSVQModel

VAR = FIXTURES.parent / "var"
needs_fixtures = pytest.mark.skipif(not (VAR / "var_tiny.pth").is_file(),
                                    reason=f"VAR fixtures not found at {VAR} (they sit beside the "
                                           f"project in shared/)")


@pytest.fixture(scope="module")
def ref():
    return load_file(str(VAR / "var_tiny_reference.safetensors"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(generator weights, tokenizer weights) of the fixture, through the command."""
    out = tmp_path_factory.mktemp("var")
    vq = main(["vqvae", str(VAR / "var_vqvae_tiny.pth"), str(out / "vq.safetensors"), "patch_nums=[1,2,3,4]"])
    gen = main(["var", str(VAR / "var_tiny.pth"), str(out / "var.safetensors"), f"tokenizer={vq}"])
    return gen, vq


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------- parity

@needs_fixtures
def test_teacher_forced_logits_match_var(converted, ref):
    model = load_generator(converted[0])
    with torch.no_grad():
        logits = model.head.logits(model.hidden(ref["var_tf_idx_BL"], ClassCondition(ref["var_tf_labels"])))
    error = max_err(logits, ref["var_tf_logits"])
    print(f"VAR teacher-forced logits, max abs error: {error:.3g}")
    assert error < 2e-5
    # the inputs the model builds from codes are VAR's idxBl_to_var_input
    features = model.inputs._features(ref["var_tf_idx_BL"], 4, 1)
    assert max_err(features, ref["var_tf_input"]) < 1e-5


@needs_fixtures
@pytest.mark.parametrize("cfg", [0, 1, 4])
def test_generation_matches_var(converted, ref, cfg):
    """top_k = 1 at VAR's cfg c = argen's cfg_scale 1 + c on the linear_full ramp: the same
    tokens at every scale, the same guided logits and the same images."""
    model, vq = load_generator(converted[0]), load_tokenizer(converted[1])
    settings = SamplingConfig(cfg_scale=1 + cfg, cfg_schedule="linear_full", top_k=1)
    labels = ClassCondition(ref["gen_labels"])
    codes = generate(model, labels, torch.arange(2), seed=0, settings=settings)
    for k, idx in enumerate(vq.split(codes)):
        assert torch.equal(idx, ref[f"gen_cfg{cfg}_idx_s{k}"]), f"scale {k}"
    weights = [scale_at(settings, k, 4) - 1 for k in range(4)]  # VAR's t = c * k / (S - 1)
    assert weights == pytest.approx(ref[f"gen_cfg{cfg}_t"].tolist(), abs=1e-12)
    with torch.no_grad():  # the guided logits, teacher-forced on the generated tokens
        rows = labels.with_null(model.cond.null) if cfg else labels
        logits = model.head.logits(model.hidden(torch.cat([codes, codes]) if cfg else codes, rows))
    if cfg:
        cond, uncond = logits.chunk(2)
    errors = []
    for k, (lo, hi) in enumerate(zip(model.order.starts, model.order.starts[1:])):
        guided = logits[:, lo:hi] if not cfg else (1 + weights[k]) * cond[:, lo:hi] - weights[k] * uncond[:, lo:hi]
        errors.append(max_err(guided, ref[f"gen_cfg{cfg}_logits_s{k}"]))
    images = (vq.decode(codes) + 1) / 2
    image_error = max_err(images, ref[f"gen_cfg{cfg}_image"])
    print(f"VAR generation cfg {cfg}: indices identical; guided logits max abs error "
          f"{max(errors):.3g}; image {image_error:.3g}")
    assert max(errors) < 1e-4 and image_error < 1e-4


# ------------------------------------------------------------------------- the release's layout

def release_tokenizer() -> MSVQModel:
    with torch.device("meta"):
        return MSVQModel(MSVQConfig())  # the release's VQVAE, shapes only


@needs_fixtures
@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_key_tables_cover_the_released_transformers(depth):
    manifests = json.loads((VAR / "var_manifest.json").read_text())["manifests"]
    name = next(k for k in manifests if k.startswith(f"var_d{depth}.pth"))
    shapes = {k: tuple(v) for k, v in manifests[name].items()}
    state = merge_var_tensors({k: torch.zeros(v, device="meta") for k, v in shapes.items()}, name)
    spec = infer_var_spec({k: tuple(v.shape) for k, v in state.items()}, release_tokenizer(), name)
    assert spec.model.size == f"VAR-d{depth}" and spec.resolution == 256 and spec.num_classes == 1000
    with torch.device("meta"):
        model = ARModel(spec)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    mapped = {rename(k, VAR_KEYS): tuple(v.shape) for k, v in state.items() if k not in VAR_DERIVED}
    assert None not in mapped
    quantizer = {k for k in own if k.startswith("inputs.quantizer.")}
    assert set(mapped) == set(own) - quantizer
    assert all(own[k] == v or k.endswith("scale_log") for k, v in mapped.items())
    # VAR's tensors but its two derived tables, less pos_start (folded into the position
    # table); the zero k bias is part of argen's qkv bias; the frozen quantiser comes on top
    var_tensors = sum(math.prod(v) for k, v in shapes.items() if k not in VAR_DERIVED)
    ours = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("inputs.quantizer."))
    assert ours == var_tensors - math.prod(shapes["pos_start"])
    print(f"VAR-d{depth}: {ours:,} parameters")


@needs_fixtures
def test_bad_checkpoints_and_tokenizers_are_named(converted, tmp_path):
    gen, vq = converted
    with pytest.raises(SystemExit, match=r"depth 2, width 128, 2 heads\), not VAR-d16"):
        main(["var", str(VAR / "var_tiny.pth"), str(tmp_path / "a.safetensors"), f"tokenizer={vq}",
              "size=VAR-d16"])
    other = main(["vqvae", str(VAR / "var_vqvae_tiny.pth"), str(tmp_path / "vq5.safetensors"),
                  "patch_nums=[1,2,3,4]"])
    cfg = load_tokenizer(other).cfg
    wrong = save_tokenizer(MSVQModel(MSVQConfig(**{**cfg.__dict__, "patch_nums": [1, 2, 4]})),
                           MSVQConfig(**{**cfg.__dict__, "patch_nums": [1, 2, 4]}), tmp_path / "vq3.safetensors")
    with pytest.raises(SystemExit, match=r"trained on 4 scales of 30 tokens .* schedule \[1, 2, 4\]"):
        main(["var", str(VAR / "var_tiny.pth"), str(tmp_path / "b.safetensors"), f"tokenizer={wrong}"])
    state = torch.load(VAR / "var_tiny.pth", weights_only=True)
    shared = {k: v for k, v in state.items() if not k.startswith("blocks.0.ada_lin")}
    shared["shared_ada_lin.1.weight"] = torch.zeros(768, 128)
    torch.save(shared, tmp_path / "d36.pth")
    with pytest.raises(SystemExit, match="shared adaLN .* is not supported"):
        main(["var", str(tmp_path / "d36.pth"), str(tmp_path / "c.safetensors"), f"tokenizer={vq}"])
    with pytest.raises(SystemExit, match="not a VAR transformer state dict"):
        main(["var", str(VAR / "var_vqvae_tiny.pth"), str(tmp_path / "d.safetensors"), f"tokenizer={vq}"])


# ------------------------------------------------------------------------- the scale order

def tiny_scale_model(**kw) -> ARModel:
    spec = GeneratorSpec(model=model_config(size="debug", order="scale", **kw), vocab_size=16,
                         multiscale=MultiScaleSpec(patch_nums=[1, 2, 4], code_dim=4),
                         grid_h=4, grid_w=4, num_classes=3, class_names=["a", "b", "c"], resolution=8)
    return ARModel(spec).eval()


def test_scale_order_layout():
    order = ScaleOrder(4, 4, [1, 2, 4])
    assert order.num_tokens == 21 and order.step_sizes == [1, 4, 16] and order.starts == [0, 1, 5, 21]
    rows, cols = order.coords()
    assert rows[0] == 1.5 and rows[1:5].tolist() == [0.5, 0.5, 2.5, 2.5] and cols[5:9].tolist() == [0, 1, 2, 3]
    codes = torch.arange(42).view(2, 21)
    assert torch.equal(order.to_grid(order.to_sequence(codes)), codes)
    with pytest.raises(ValueError, match=r"needs every scale's codes, \(B, 21\)"):
        order.to_sequence(torch.zeros(2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="increasing sides ending at the 4x4 grid"):
        ScaleOrder(4, 4, [1, 2, 3])


@pytest.mark.parametrize("kw", [{}, dict(rope="none", pos_embed="learned", level_embed=True,
                                         cond_prefix="vector", backbone=dict(adaln=True))],
                         ids=["argen", "var-like"])
def test_cached_decoding_equals_full_forward(kw):
    from ar.config import BackboneConfig

    if "backbone" in kw:
        kw = {**kw, "backbone": BackboneConfig(**kw["backbone"])}
    torch.manual_seed(0)
    model = tiny_scale_model(**kw)
    for p in model.parameters():  # away from the zero init, so every input matters
        torch.nn.init.normal_(p, std=0.3)
    seq = torch.randint(0, 16, (3, 21))
    cond = ClassCondition(torch.tensor([0, 2, 1]))
    with torch.no_grad():
        full = model.head.logits(model.hidden(seq, cond))
    assert torch.allclose(cached_logits(model, seq, cond), full, atol=1e-4)
    codes = generate(model, cond, torch.arange(3), 0, SamplingConfig(cfg_scale=2.0, top_k=4, top_p=0.9))
    assert codes.shape == (3, 21) and int(codes.max()) < 16


def test_scale_order_configuration_errors():
    for kw, match in ((dict(order="scale", inputs="next_group"), "next-scale inputs go with the scale order"),
                      (dict(order="scale", head="flow"), "next-scale inputs go with the scale order"),
                      (dict(cond_prefix="vector"), "class_condition.prefix=vector repeats the adaLN class vector")):
        with pytest.raises(ConfigError, match=match):
            model_config(**kw).validate()
    with pytest.raises(ValueError, match=r"model.class_condition.tokens must be 1 \(= 1\^2\), not 2"):
        tiny_scale_model(cond_tokens=2)


# ------------------------------------------------------------------------- the code cache

def tiny_msvq(tmp_path):
    cfg = MSVQConfig(codebook_size=16, codebook_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                     patch_nums=[1, 2, 4])
    torch.manual_seed(0)
    return save_tokenizer(MSVQModel(cfg), cfg, tmp_path / "msvq.safetensors")


def test_per_scale_cache_holds_every_scale_of_image_and_mirror(tmp_path):
    weights = tiny_msvq(tmp_path)
    make_image_folder(tmp_path / "data", 8)
    meta = encode([f"data.root={tmp_path / 'data'}", "data.resolution=8", f"tokenizer={weights}",
                   f"out={tmp_path / 'codes'}", "num_workers=0"])
    assert meta["kind"] == "multiscale" and meta["scales"] == [1, 2, 4] and meta["grid"] == [4, 4]
    cache = open_cache(tmp_path / "codes")
    assert isinstance(cache, ScaleCodeCache) and cache.seq_len == 21
    from dataset.folder import ClassFolderDataset

    tok, data = load_tokenizer(weights), ClassFolderDataset(tmp_path / "data", 8)
    images = torch.stack([data[i][0] for i in range(2)])
    both = cache.get(torch.tensor([0, 1, 0]).numpy(), torch.tensor([0, 0, 1]).numpy())
    assert torch.equal(both[:2], tok.encode(images)) and torch.equal(both[2:], tok.encode(images[:1].flip(-1)))
    with pytest.raises(SystemExit, match=r"scale schedule \[1, 2, 4\] ends at 4: use 8 px"):
        encode([f"data.root={tmp_path / 'data'}", "data.resolution=16", f"tokenizer={weights}",
                f"out={tmp_path / 'codes16'}", "num_workers=0"])


# ------------------------------------------------------------------------- the pipeline

SCALE = ["model.size=debug", "model.order.name=scale", "model.token_dropout=0", "model.resid_dropout=0",
         "model.ffn_dropout=0", "train.global_batch=4", "train.max_steps=6", "train.log_every=2",
         "train.ckpt_every=3", "train.device=cpu", "train.threads=1", "train.precision=fp32",
         "grid.per_class=1"]
SAMPLE = ["device=cpu", "batch_size=2", "shard_size=2", "sampling.cfg_scale=2.0",
          "sampling.cfg_schedule=linear_full", "precision=fp32"]


@pytest.fixture(scope="module")
def scale_codes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    make_image_folder(root / "data", 8)
    weights = tiny_msvq(root)
    encode([f"data.root={root / 'data'}", "data.resolution=8", f"tokenizer={weights}",
            f"out={root / 'codes'}", "num_workers=0"])
    return root


def test_next_scale_model_trains_and_samples(scale_codes, tmp_path):
    from test_flow_pipeline import run

    run("train_gen.py", f"out_dir={tmp_path / 'gen'}", f"data.codes={scale_codes / 'codes'}", *SCALE)
    weights = tmp_path / "gen" / "weights" / "ema.safetensors"
    model, tok = load_generator(weights), load_tokenizer(scale_codes / "msvq.safetensors")
    assert model.spec.multiscale.patch_nums == [1, 2, 4] and model.inputs.kind == "next_scale"
    for key, value in tok.quantize.state_dict().items():  # the frozen copy of the quantiser
        assert torch.equal(model.inputs.quantizer.state_dict()[key], value), key
    assert (tmp_path / "gen" / "grid_final.png").is_file()
    run("sample.py", f"weights={weights}", f"out={tmp_path / 'images'}", "mode=images", "num_images=4", *SAMPLE)
    import numpy as np

    assert np.load(tmp_path / "images" / "samples.npz")["arr_0"].shape == (4, 8, 8, 3)
    cfg = MSVQConfig(**{**tok.cfg.__dict__, "patch_nums": [1, 4]})
    other = save_tokenizer(MSVQModel(cfg), cfg, tmp_path / "other.safetensors")
    proc = run("sample.py", f"weights={weights}", f"tokenizer={other}", f"out={tmp_path / 'x.png'}",
               *SAMPLE, ok=False)
    assert proc.returncode == 1 and "scale schedule [1, 4] vs the generator's [1, 2, 4]" in proc.stderr


def test_cache_and_model_kinds_must_fit(scale_codes, tmp_path):
    from conftest import make_code_cache
    from test_flow_pipeline import run

    proc = run("train_gen.py", f"out_dir={tmp_path / 'a'}", f"data.codes={scale_codes / 'codes'}",
               "model.size=debug", "train.device=cpu", ok=False)
    assert proc.returncode == 1 and "holds per-scale codes" in proc.stderr
    assert "set model.order.name=scale" in proc.stderr
    codes = make_code_cache(tmp_path / "codes")
    proc = run("train_gen.py", f"out_dir={tmp_path / 'b'}", f"data.codes={codes}", *SCALE, ok=False)
    assert proc.returncode == 1 and "holds discrete codes, one grid per image" in proc.stderr
    assert "multi-scale (msvq) tokenizer" in proc.stderr


# ------------------------------------------------------------------------- VAR's training recipes

# VAR's README and utils/arg_util.py: (batch, epochs, lr = tblr x batch / 256)
VAR_RECIPES = {16: (768, 200, 3e-4), 20: (768, 250, 3e-4), 24: (768, 350, 2.4e-4), 30: (1024, 350, 3.2e-4)}


@needs_fixtures
@pytest.mark.parametrize("depth", sorted(VAR_RECIPES))
def test_var_recipes_follow_var_and_build_the_released_architecture(depth):
    from common.schedule import lr_at
    from common.config import load_config
    from conftest import ROOT
    from train_gen import RunConfig, warmup_of

    cfg = load_config(RunConfig, [str(ROOT / "configs" / "imagenet256" / f"VAR-d{depth}.yaml")])
    t, (batch, epochs, lr) = cfg.train, VAR_RECIPES[depth]
    assert (t.global_batch, t.max_steps, t.lr) == (batch, round(epochs * 1281167 / batch), lr)
    assert (t.beta1, t.beta2, t.weight_decay, t.grad_clip, t.cond_dropout, t.ema_decay) == \
        (0.9, 0.95, 0.05, 2.0, 0.1, 0.0)
    assert cfg.model.backbone.drop_path == pytest.approx(0.1 * depth / 24, abs=1e-4)
    manifests = json.loads((VAR / "var_manifest.json").read_text())["manifests"]
    shapes = {k: tuple(v) for k, v in manifests[next(k for k in manifests if k.startswith(f"var_d{depth}."))].items()}
    state = merge_var_tensors({k: torch.zeros(v, device="meta") for k, v in shapes.items()}, "release")
    release = infer_var_spec({k: tuple(v.shape) for k, v in state.items()}, release_tokenizer(), "release")
    spec = GeneratorSpec(model=cfg.model, vocab_size=4096, multiscale=release.multiscale, grid_h=16,
                         grid_w=16, num_classes=1000)
    with torch.device("meta"):
        ours, theirs = ARModel(spec), ARModel(release)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert var_model_config(1024, 16, 16, 4096, 1).rope == cfg.model.rope == "none"

    def lr_at_frac(frac):
        return lr_at(int(frac * t.max_steps), t.lr, warmup_of(t), t.max_steps, t.schedule,
                     t.min_lr_ratio, t.decay_start)

    assert lr_at_frac(0) < 1e-3 * lr and lr_at_frac(0.021) == lr_at_frac(0.068) == lr
    assert lr_at_frac(1.0) == pytest.approx(0.01 * lr) and lr_at_frac(0.5) == pytest.approx(
        lr * (0.01 + 0.99 * (1 - (0.5 - 0.069) / 0.931)), rel=1e-4)
