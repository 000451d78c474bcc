"""Every shipped config is valid under its schema, and the ImageNet ones build their model."""


import pytest
import torch

from ar.model import ARModel, GeneratorSpec
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
