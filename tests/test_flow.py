"""Flow-matching next-X on the one model, for every order: the cached sampling path equals the
full forward pass, training learns, and configs that cannot work are named errors."""

from __future__ import annotations

import pytest
import torch

from ar.conditioning import ClassCondition
from ar.config import BackboneConfig, GeneratorSpec
from ar.model import ARModel
from common.config import ConfigError
from conftest import model_config
from sampling.flow import _Velocity, generate_flow
from sampling.context import open_context
from sampling.settings import SamplingConfig

ORDERS = [dict(order="cell", cell=2), dict(order="cell", cell=1), dict(order="raster"),
          dict(order="subsample", subsample=2), dict(order="whole")]


def flow_model(seed: int = 0, channels: int = 4, grid: int = 4, **kw) -> ARModel:
    backbone = kw.pop("backbone", BackboneConfig(adaln=True, bias=True, ffn_gate="gelu",
                                                 block_norm_affine=False, input_norm=True, split=1))
    model_kw = dict(size="debug", head="flow", cond_tokens=0, pos_embed="learned", backbone=backbone,
                    token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    model_kw.update(kw)
    spec = GeneratorSpec(model=model_config(**model_kw), latent_channels=channels, grid_h=grid,
                         grid_w=grid, num_classes=3, class_names=["a", "b", "c"], resolution=grid * 4)
    torch.manual_seed(seed)
    model = ARModel(spec).eval()
    for p in model.parameters():  # away from the zero init, so every path matters
        torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o["order"] + str(o.get("cell", o.get("subsample", ""))))
@pytest.mark.parametrize("prefix", [0, 1])
@torch.no_grad()
def test_cached_velocity_equals_full_forward(order, prefix):
    """Step s through the KV cache (clean earlier steps fed with the first call, then only the
    noisy group) gives the velocity of a full forward pass whose earlier steps are clean."""
    model = flow_model(cond_tokens=prefix, **order)
    o, B, t = model.order, 2, 0.7
    rows = ClassCondition(torch.tensor([0, 2]))
    clean = torch.randn(B, o.num_tokens, 4)
    noisy = torch.randn(B, o.num_tokens, 4)
    velocity = _Velocity(open_context(model, rows, torch.arange(B), 0, SamplingConfig()))
    for s in range(o.num_steps):
        lo, hi = o.span(s)
        pos = model.inputs.out_positions[lo:hi]
        for repeat in range(2):  # the second call of a step feeds only the noisy group
            cached = velocity(noisy[:, lo:hi], t, pos)
            seq = torch.cat([clean[:, :lo], noisy[:, lo:]], dim=1)
            times = torch.zeros(B, o.num_steps)
            times[:, s:] = t
            full = model.head.velocity(model.hidden(seq, rows, times))[:, lo:hi]
            assert torch.allclose(cached, full, atol=1e-4), (s, repeat, (cached - full).abs().max())
        velocity.context = (clean[:, lo:hi], pos)


def test_noisy_context_training_learns():
    """150 Adam steps on 8 fixed latent grids bring the loss well below that of v = 0 (about
    2: data and noise variance); the noise keeps a floor above 0."""
    torch.manual_seed(0)
    spec_model = flow_model(order="cell", cell=2)
    model = ARModel(spec_model.spec).train()  # our own init: adaLN-zero, zero head
    data = torch.randn(8, 4, 4, 4)
    cond = ClassCondition(torch.arange(8) % 3)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = model(data, cond)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_zero_init_starts_from_identity_blocks():
    """Our init: adaLN-zero blocks pass their input through and the head predicts v = 0."""
    model = ARModel(flow_model(order="cell", cell=2).spec)  # 4 steps
    v = model.head.velocity(model.hidden(torch.randn(2, 16, 4), ClassCondition(torch.tensor([0, 1])),
                                         torch.rand(2, 4)))
    assert torch.count_nonzero(v) == 0
    assert all(torch.count_nonzero(layer.modulation[-1].weight) == 0 for layer in model.transformer.layers)


@torch.no_grad()
def test_sampling_gives_latent_grids_for_every_order():
    for order in ORDERS:
        model = flow_model(**order)
        for sampler in ("sde", "ode"):
            settings = SamplingConfig(cfg_scale=2.0, flow_sampler=sampler, flow_steps=3)
            out = generate_flow(model, ClassCondition(torch.tensor([0, 1])), torch.arange(2), 0, settings)
            assert out.shape == (2, 4, 4, 4) and torch.isfinite(out).all()


def test_configs_that_cannot_work_are_named():
    with pytest.raises(ConfigError, match="flow head"):
        model_config(head="flow", inputs="next_group").validate()
    with pytest.raises(ConfigError, match="flow head"):
        model_config(head="token", inputs="flow").validate()
    with pytest.raises(ConfigError, match="adaln"):
        model_config(head="flow", cond_tokens=0).validate()
    with pytest.raises(ConfigError, match="split"):
        model_config(head="flow", backbone=BackboneConfig(split=2)).validate()  # debug: 2 layers
