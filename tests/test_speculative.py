"""Speculative decoding: the lossless rules draw exactly plain sampling's distribution over whole
sequences, for batches that mix classes and drafts from the token (or cell) above (and a
deliberately broken rule is caught by the same test), the grouped rule computes GSD's group by
hand and never emits a token top-k / top-p removed, rows of a batch are independent, greedy
decoding is unchanged."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ar.conditioning import ClassCondition
from ar.config import GeneratorSpec
from ar.model import ARModel
from conftest import model_config, tiny_model
from sampling import speculative, verify as rules
from sampling.generate import generate
from sampling.settings import SamplingConfig
from sampling.guidance import step_scales
from sampling.generate import sample_codes
from sampling.speculative import SpeculativeConfig


def small_model(vocab: int, grid_h: int, grid_w: int, seed: int = 0, **kw) -> ARModel:
    """A debug model over a tiny vocabulary and grid, with sharp context-dependent predictions."""
    model_kw = dict(size="debug", token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, cond_add=True)
    model_kw.update(kw)
    spec = GeneratorSpec(model=model_config(**model_kw), vocab_size=vocab, grid_h=grid_h, grid_w=grid_w,
                         num_classes=2, class_names=["a", "b"], resolution=grid_h * 4)
    torch.manual_seed(seed)
    model = ARModel(spec).eval()
    torch.nn.init.normal_(model.head.output.weight, std=0.15)  # 2.5-3.7 nats over the sequences
    return model


@torch.no_grad()
def targets(model: ARModel, seqs: torch.Tensor, labels: torch.Tensor, settings: SamplingConfig):
    """Plain sampling's distribution (M, N, V) at every element of the sequences (M, N) with
    the classes (M,), from the teacher-forced forward pass with plain sampling's CFG and filters."""
    h, scale = model.hidden(seqs, ClassCondition(labels)), None
    if settings.cfg_scale != 1.0:
        null = ClassCondition(torch.full_like(labels, model.cond.null))
        h = torch.cat([h, model.hidden(seqs, null)])  # conditional rows first, as sampling's
        scale = step_scales(settings, model.order.num_steps)[model.order.step_of][:, None]
    return model.head.probs(h, scale, settings)


def exact_distribution(model: ARModel, label: int, settings: SamplingConfig) -> dict:
    """Plain sampling's probability of every sequence (as a grid, row-major tuple)."""
    order, V = model.order, model.head.vocab_size
    seqs = torch.tensor(list(itertools.product(range(V), repeat=order.num_tokens)))
    p = targets(model, seqs, torch.full((len(seqs),), label), settings)  # (M, N, V)
    prob = p.gather(-1, seqs[..., None])[..., 0].prod(-1)
    grids = order.to_grid(seqs).flatten(1)
    return {tuple(g.tolist()): float(pr) for g, pr in zip(grids, prob)}


LABELS = (0, 1)  # every sampled batch mixes the classes, row by row


def exact_mixed(model: ARModel, settings: SamplingConfig) -> dict:
    """The probability of every (label, sequence) in a batch that cycles through LABELS."""
    share = 1.0 / len(LABELS)
    return {(label, seq): share * prob for label in LABELS
            for seq, prob in exact_distribution(model, label, settings).items()}


def chi_square(counts: dict, probs: dict, total: int) -> tuple[float, int]:
    """Pearson's statistic over the sequences, those expected fewer than 5 times pooled; and
    the degrees of freedom."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    assert set(counts) <= {k for k, v in probs.items() if v > 0}, "a sequence of probability 0 was drawn"
    for key, prob in probs.items():
        expected, observed = prob * total, counts.get(key, 0)
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + observed, pooled_exp + expected
            continue
        stat += (observed - expected) ** 2 / expected
        cells += 1
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    return stat, cells - 1


def chi_square_limit(dof: int, z: float = 4.26) -> float:
    """The chi-square quantile at about 1 - 1e-5 (Wilson-Hilferty; z is the normal quantile)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1 - a + z * math.sqrt(a)) ** 3


def mixed_counts(codes: torch.Tensor, labels: torch.Tensor) -> dict:
    counts = {}
    for label, row in zip(labels.tolist(), codes.flatten(1).tolist()):
        counts[label, tuple(row)] = counts.get((label, tuple(row)), 0) + 1
    return counts


def sampled_counts(model, settings, sampler, spec, n, seed=0) -> dict:
    """Counts of (label, sequence) over n images of a batch that cycles through LABELS."""
    labels = torch.tensor(LABELS).repeat(n // len(LABELS))
    codes, _ = sample_codes(model, ClassCondition(labels), torch.arange(n), seed, settings,
                                    sampler, spec)
    return mixed_counts(codes, labels)


CASES = {  # name -> (vocab, grid h, grid w, model options): 81 and 256 sequences a class
    "raster": (3, 2, 2, dict()),
    "cell": (2, 4, 2, dict(order="cell", cell=2)),  # two 2x2 cells, one above the other
}
SETTINGS = SamplingConfig(cfg_scale=2.0, cfg_schedule="linear", top_p=0.95)
N_SAMPLES = 4000  # broken rule: statistic 340 and 670 against limits of 103 and 109; lossless ones ~dof
RUNS = [  # (case, sampler, init, window)
    ("raster", "sjd", "random", 3), ("raster", "sjd", "above", 3), ("raster", "coupled", "above", 3),
    ("cell", "sjd", "above", 1),  # the lower cell's drafts copy the committed upper cell
    ("cell", "coupled", "above", 2),  # ... or the upper cell's drafts in the same window
    ("cell", "coupled", "random", 2)]


def run_statistic(case: str, sampler: str, init: str, window: int) -> tuple[float, int]:
    vocab, gh, gw, kw = CASES[case]
    model = small_model(vocab, gh, gw, **kw)
    if init == "above":  # some drafts really come from above
        assert bool((model.order.above() >= 0).any())
    counts = sampled_counts(model, SETTINGS, sampler, SpeculativeConfig(window=window, init=init), N_SAMPLES)
    return chi_square(counts, exact_mixed(model, SETTINGS), N_SAMPLES)


@pytest.mark.parametrize("case,sampler,init,window", RUNS)
def test_lossless_rules_draw_plain_samplings_distribution(case, sampler, init, window):
    stat, dof = run_statistic(case, sampler, init, window)
    assert stat < chi_square_limit(dof), (stat, dof)


def _residual_from_p(rule, p, q, drafts, u, noise, group=None):
    """A classic bug: a rejected slot draws from p itself instead of the residual."""
    accepted, _, redrawn, q_next = rules.verify("sjd", p, q, drafts, u, noise, group)
    return accepted, torch.where(accepted, drafts, rules.race(p, noise)), redrawn, q_next


@pytest.mark.parametrize("run", [RUNS[1], RUNS[3]], ids=["raster", "cell"])
def test_the_distribution_test_catches_a_broken_rule(monkeypatch, run):
    """The bug shows only where a fresh draft (one-hot q) is rejected: at every step with window
    1, but with the cell case's window 2 (the whole image) in the first pass only, too rarely
    to be caught there."""
    monkeypatch.setattr(speculative, "verify", _residual_from_p)
    stat, dof = run_statistic(*run)
    assert stat > chi_square_limit(dof), (stat, dof)


def test_plain_sampling_passes_the_same_test():
    """The test's own check: plain sampling's counts fit its exact distribution."""
    vocab, gh, gw, kw = CASES["cell"]
    model = small_model(vocab, gh, gw, **kw)
    labels = torch.tensor(LABELS).repeat(N_SAMPLES // len(LABELS))
    codes = generate(model, ClassCondition(labels), torch.arange(N_SAMPLES), 1, SETTINGS)
    stat, dof = chi_square(mixed_counts(codes, labels), exact_mixed(model, SETTINGS), N_SAMPLES)
    assert stat < chi_square_limit(dof), (stat, dof)


@pytest.mark.parametrize("kw", [dict(), dict(order="cell", cell=2)])
@pytest.mark.parametrize("sampler", ["sjd", "coupled", "gsd"])
def test_greedy_speculative_decoding_equals_greedy_plain_decoding(kw, sampler):
    model = tiny_model(**kw)
    cond, ids = ClassCondition(torch.tensor([0, 1, 2, 1])), torch.arange(4)
    settings = SamplingConfig(temperature=0.0, cfg_scale=2.0)
    plain = generate(model, cond, ids, 0, settings)
    for window, init in [(1, "random"), (4, "above"), (16, "random")]:
        codes, stats = sample_codes(model, cond, ids, 0, settings, sampler,
                                            SpeculativeConfig(window=window, init=init))
        assert torch.equal(codes, plain), (window, init)
        assert stats.steps == 4 * model.order.num_steps and stats.passes <= stats.steps


@pytest.mark.parametrize("sampler", ["sjd", "coupled", "gsd"])
def test_each_row_gets_what_it_gets_alone(sampler):
    model = tiny_model(order="cell", cell=2, grid=8)
    settings = SamplingConfig(cfg_scale=1.5, top_k=20)
    spec = SpeculativeConfig(window=5, init="above", gsd_d_threshold=10.0)
    labels, ids = torch.tensor([2, 0, 1, 1, 0]), torch.tensor([7, 3, 11, 4, 9])
    together, stats = sample_codes(model, ClassCondition(labels), ids, 5, settings, sampler, spec)
    alone = [sample_codes(model, ClassCondition(labels[i:i + 1]), ids[i:i + 1], 5, settings,
                                  sampler, spec) for i in range(5)]
    assert torch.equal(together, torch.cat([codes for codes, _ in alone]))
    assert stats.passes == sum(s.passes for _, s in alone)
    assert stats.batch_passes == max(s.batch_passes for _, s in alone)
    # rows do not advance in lockstep: some need fewer passes than the batch ran
    assert min(s.passes for _, s in alone) < stats.batch_passes


def test_grouped_mass_by_hand():
    # vocabulary of 6; ascending target order: 5, 4, 3, 2, 1, 0 (token 0 the most likely)
    p = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.06, 0.04])[None, None]
    q = torch.tensor([0.10, 0.10, 0.40, 0.10, 0.10, 0.20])[None, None]
    embeddings = torch.tensor([[0.0], [0.5], [0.0], [0.6], [2.0], [0.1]])
    draft = torch.tensor([[2]])  # rank 3 in ascending order
    # ranks 3 - 2 .. 3 + 1 -> tokens 4, 3, 2, 1; |p - 0.2| < 0.12 drops token 4 (0.14 away);
    # squared distance to token 2's embedding < 0.3 drops token 3 (0.36)
    mass_p, mass_q = rules.grouped_mass(p, q, draft, embeddings, 2, 0.12, 0.3)
    assert mass_p.item() == pytest.approx(0.20 + 0.25)  # tokens 2 and 1
    assert mass_q.item() == pytest.approx(0.40 + 0.10)
    # at the top of the order the window (ranks 3..6) is cut at the vocabulary's end: ranks
    # 3..5, tokens 2, 1, 0
    mass_p, mass_q = rules.grouped_mass(p, q, torch.tensor([[0]]), embeddings, 2, 1.0, 10.0)
    assert (mass_p.item(), mass_q.item()) == pytest.approx((0.75, 0.60))
    # a draft the target keeps is always in its group, so the test never divides by zero
    mass_p, mass_q = rules.grouped_mass(p, q, draft, embeddings, 7, 1e-6, 1e-6)
    assert (mass_p.item(), mass_q.item()) == pytest.approx((0.20, 0.40))


def test_gsd_accepts_more_than_sjd_on_the_same_drafts():
    p = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.06, 0.04]).expand(1, 3, 6)
    q = torch.tensor([0.02, 0.02, 0.90, 0.02, 0.02, 0.02]).expand(1, 3, 6)
    drafts = torch.tensor([[2, 2, 2]])
    u = torch.tensor([[0.3, 0.5, 0.9]])  # p/q = 0.22: sjd rejects all three
    noise = torch.full((1, 3, 6), 0.5)
    assert not rules.verify("sjd", p, q, drafts, u, noise)[0].any()
    group = (torch.zeros(6, 1), 7, 1.0, 1.0)  # every token joins: sum p / sum q = 1
    assert rules.verify("gsd", p, q, drafts, u, noise, group)[0].all()
    group = (torch.zeros(6, 1), 1, 1.0, 1.0)  # tokens 3 and 2: (0.15 + 0.2) / (0.02 + 0.9) = 0.38
    assert rules.verify("gsd", p, q, drafts, u, noise, group)[0].tolist() == [[True, False, False]]


def test_gsd_never_accepts_a_draft_the_filter_removed():
    # top-k 4 removed tokens 4 and 5 (p = 0); the draft 4 ranks next to kept tokens of small p
    p = torch.tensor([0.40, 0.30, 0.20, 0.10, 0.0, 0.0])[None, None]
    q = torch.full((1, 1, 6), 1 / 6)
    drafts, u, noise = torch.tensor([[4]]), torch.tensor([[0.01]]), torch.full((1, 1, 6), 0.5)
    group = (torch.zeros(6, 1), 7, 0.15, 1.0)  # tokens 3 (0.10 from p(4) = 0) and 5 join its group
    accepted, committed, _, _ = rules.verify("gsd", p, q, drafts, u, noise, group)
    assert not accepted.item() and p[0, 0, committed.item()] > 0
    assert rules.verify("gsd", p, q, torch.tensor([[3]]), u, noise, group)[0].item()  # a kept draft


def test_gsd_emits_only_tokens_that_top_k_and_top_p_keep():
    """Random drafts mostly fall outside the top-k; their groups of near-zero neighbours must not
    let them through. Every emitted token is checked against the filtered target of its slot."""
    model = tiny_model()
    labels, ids = torch.tensor([0, 1, 2] * 8), torch.arange(24)
    for settings in (SamplingConfig(cfg_scale=1.5, top_k=6), SamplingConfig(top_p=0.5)):
        codes, _ = sample_codes(model, ClassCondition(labels), ids, 3, settings, "gsd",
                                        SpeculativeConfig(window=8, gsd_d_threshold=100.0))
        seqs = model.order.to_sequence(codes)
        p = targets(model, seqs, labels, settings)  # (B, N, V)
        removed = int((p.gather(-1, seqs[..., None]) == 0).sum())
        assert removed == 0, f"{removed} of {seqs.numel()} tokens the filter removed ({settings})"


def test_unsupported_models_are_refused_by_name():
    from test_next_scale import tiny_scale_model
    cond, ids = ClassCondition(torch.tensor([0])), torch.arange(1)
    with pytest.raises(ValueError, match="next_scale.*sampler=plain"):
        sample_codes(tiny_scale_model(), cond, ids, 0, SamplingConfig(), "sjd", SpeculativeConfig())
    from test_flow import flow_model
    with pytest.raises(ValueError, match="flow model.*sampler=plain"):
        sample_codes(flow_model(), cond, ids, 0, SamplingConfig(), "coupled", SpeculativeConfig())
    with pytest.raises(ValueError, match="sampler='beam'"):
        sample_codes(tiny_model(), cond, ids, 0, SamplingConfig(), "beam", SpeculativeConfig())
