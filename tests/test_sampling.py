"""Logits processing, CFG, counter-based noise and the generate loop."""

import math

import torch

from ar.conditioning import ClassCondition
from ar.logits import combine_cfg, process_logits, sample_categorical, top_k_mask, top_p_mask
from conftest import tiny_model
from sampling import noise
from sampling.generate import generate
from sampling.settings import SamplingConfig
from sampling.guidance import cfg_scale_at


def test_cfg_combination_equals_formula():
    cond, uncond = torch.randn(3, 7), torch.randn(3, 7)
    assert torch.allclose(combine_cfg(cond, uncond, 2.5), uncond + 2.5 * (cond - uncond))
    assert torch.allclose(combine_cfg(cond, uncond, 1.0), cond)


def test_cfg_schedules():
    assert [cfg_scale_at(3.0, "constant", t, 4) for t in range(4)] == [3.0] * 4
    assert [cfg_scale_at(3.0, "linear", t, 4) for t in range(4)] == [1.0, 1.5, 2.0, 2.5]
    assert [cfg_scale_at(3.0, "half_linear", t, 4) for t in range(4)] == [1.0, 2.0, 3.0, 3.0]
    assert [cfg_scale_at(3.0, "cosine", t, 2) for t in range(2)] == [1.0, 2.0]
    assert [cfg_scale_at(3.0, "power", t, 4, power=2.0) for t in range(4)] == [1.0, 1.125, 1.5, 2.125]


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = torch.isfinite(top_k_mask(logits, 2))
    assert kept.tolist() == [[False, True, False, True, False]]
    assert torch.equal(top_k_mask(logits, 0), logits)


def test_top_p_keeps_smallest_set_reaching_the_mass():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    assert torch.isfinite(top_p_mask(logits, 0.75)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(top_p_mask(logits, 0.79)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(top_p_mask(logits, 0.81)).tolist() == [[True, False, True, True]]
    assert torch.isfinite(top_p_mask(logits, 0.01)).tolist() == [[True, False, False, False]]


def test_greedy_and_temperature():
    logits = torch.tensor([[1.0, 4.0, 2.0]])
    u = torch.full((1, 3), 0.5)
    assert sample_categorical(process_logits(logits, temperature=0), u, temperature=0).item() == 1
    scaled = process_logits(logits, temperature=2.0)
    assert torch.allclose(scaled, logits / 2)


def test_exponential_race_sampling_matches_the_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 40000
    u = noise.uniform(noise.image_keys(7, torch.arange(n)), 0, 4)
    draws = sample_categorical(probs.log().expand(n, 4), u)
    counts = torch.bincount(draws, minlength=4).double()
    expected = probs.double() * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom, p = 0.001


def test_noise_is_uniform_keyed_and_independent_of_batching():
    ids = torch.arange(1000)
    keys = noise.image_keys(3, ids)
    u = noise.uniform(keys, 5, 64)
    assert u.min() > 0 and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert abs(u.std().item() - math.sqrt(1 / 12)) < 0.01
    # image 17's noise is the same alone or inside any batch
    alone = noise.uniform(noise.image_keys(3, torch.tensor([17])), 5, 64)
    assert torch.equal(alone[0], u[17])
    # other seeds, steps and images give other noise
    assert not torch.equal(noise.uniform(noise.image_keys(4, ids), 5, 64), u)
    assert not torch.equal(noise.uniform(keys, 6, 64), u)
    corr = torch.corrcoef(torch.stack([u[:-1].flatten(), u[1:].flatten()]))[0, 1]
    assert abs(corr.item()) < 0.02
    labels = noise.randint(0, torch.arange(8000), 8)
    assert torch.bincount(labels, minlength=8).min() > 900


def test_generate_is_independent_of_batch_composition():
    model = tiny_model()
    settings = SamplingConfig(cfg_scale=2.0, temperature=1.0, top_k=10)
    labels, ids = torch.tensor([0, 1, 2, 1]), torch.tensor([10, 11, 12, 13])
    together = generate(model, ClassCondition(labels), ids, 5, settings)
    apart = torch.cat([generate(model, ClassCondition(labels[i:i + 1]), ids[i:i + 1], 5, settings)
                       for i in range(4)])
    assert together.shape == (4, 4, 4) and torch.equal(together, apart)
    other_seed = generate(model, ClassCondition(labels), ids, 6, settings)
    assert not torch.equal(together, other_seed)


def test_generate_samples_from_the_model_distribution():
    """With a one-token model the sampler's frequencies must match softmax(logits)."""
    model = tiny_model(grid=1)
    n = 4000
    labels = torch.zeros(n, dtype=torch.long)
    codes = generate(model, ClassCondition(labels), torch.arange(n), 0, SamplingConfig(temperature=1.0))
    with torch.no_grad():
        model.setup_cache(1)
        probs = model.head.logits(model.prefill(ClassCondition(labels[:1]))[0][:, -1])[0].softmax(-1).double()
    counts = torch.bincount(codes.flatten(), minlength=32).double()
    keep = probs * n >= 5  # chi-square needs expected counts of at least 5
    chi2 = ((counts[keep] - probs[keep] * n) ** 2 / (probs[keep] * n)).sum().item()
    assert chi2 < 3 * keep.sum().item()  # far below what a wrong distribution gives
