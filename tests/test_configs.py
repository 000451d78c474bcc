"""Every shipped config is valid under its schema, and the ImageNet ones build their model."""


import pytest
import torch

from ar.config import GeneratorSpec
from ar.model import ARModel
from train_gen import RunConfig
from common.config import load_config
from conftest import ROOT

GEN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs" / "imagenet256").glob("*.yaml"))
# LlamaGen's c2i recipe (its README and train_c2i.py): AdamW lr 1e-4, wd 0.05, betas (0.9, 0.95),
# global batch 256, grad clip 1.0, class dropout 0.1, 300 epochs (2e-4 for XL, its issue #8);
# parameter counts from its paper.
LLAMAGEN = {"AR-B.yaml": (111e6, 1e-4), "AR-L.yaml": (343e6, 1e-4), "AR-XL.yaml": (775e6, 2e-4)}


@pytest.mark.parametrize("path", GEN_CONFIGS, ids=lambda p: p.name)
def test_generator_configs_load(path):
    # debug.yaml leaves data.codes to the command line, as its header says
    cfg = load_config(RunConfig, [str(path)], ["data.codes=CODES"] if path.name == "debug.yaml" else [])
    assert cfg.model.size and cfg.train.max_steps > 0


@pytest.mark.parametrize("name", sorted(LLAMAGEN))
def test_imagenet_configs_follow_llamagen_and_build_on_meta(name):
    cfg = load_config(RunConfig, [str(ROOT / "configs" / "imagenet256" / name)])
    t, (params, lr) = cfg.train, LLAMAGEN[name]
    assert t.max_steps == 1501400  # 300 epochs of 1,281,167 images
    assert (t.lr, t.weight_decay, t.beta1, t.beta2, t.global_batch, t.grad_clip, t.cond_dropout) == \
        (lr, 0.05, 0.9, 0.95, 256, 1.0, 0.1)
    spec = GeneratorSpec(model=cfg.model, vocab_size=16384, grid_h=16, grid_w=16, num_classes=1000)
    with torch.device("meta"):
        model = ARModel(spec)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - params) / params < 0.02, n


# xAR's recipe (README, main_mar.py, util/lr_sched.py): 800 epochs at global batch 2048, lr 4e-4,
# betas (0.9, 0.96), wd 0.02, clip 1.0, dropout 0.1, EMA 0.9999; warm-up 100 epochs, constant to
# epoch 600, cosine to min_lr 1e-5. Parameter counts as the released code builds them.
XAR = {"xAR-B.yaml": 172_638_224, "xAR-L.yaml": 608_397_968, "xAR-H.yaml": 1_186_024_096}


@pytest.mark.parametrize("name", sorted(XAR))
def test_xar_configs_follow_xar_and_build_its_architecture(name):
    from common.schedule import lr_at
    from train_gen import warmup_of

    cfg = load_config(RunConfig, [str(ROOT / "configs" / "imagenet256" / name)])
    t = cfg.train
    assert t.max_steps == round(800 * 1281167 / 2048)
    assert (t.lr, t.weight_decay, t.beta1, t.beta2, t.global_batch, t.grad_clip, t.cond_dropout,
            t.ema_decay) == (4e-4, 0.02, 0.9, 0.96, 2048, 1.0, 0.1, 0.9999)
    assert cfg.model.resid_dropout == cfg.model.backbone.attn_dropout == 0.1
    spec = GeneratorSpec(model=cfg.model, latent_channels=16, grid_h=16, grid_w=16, num_classes=1000)
    with torch.device("meta"):
        model = ARModel(spec)
    assert sum(p.numel() for p in model.parameters()) == XAR[name]
    for total in (t.max_steps, t.max_steps // 2):  # the phases scale with the run's length
        cfg.train.max_steps = total

        def lr(frac):
            return lr_at(int(frac * total), t.lr, warmup_of(t), total, t.schedule, t.min_lr_ratio,
                         t.decay_start)

        assert lr(0.0) < 1e-2 * t.lr and lr(0.125) == lr(0.5) == lr(0.75) == t.lr
        assert t.lr * 0.5 < lr(0.875) < t.lr * 0.55 and abs(lr(1.0) - 1e-5) < 1e-9
