"""Orders, the block mask, and the one sampling loop for every order: cached decoding equals the
full forward, a group draw follows the head's probabilities, guidance schedules."""

import math

import pytest
import torch

from ar.conditioning import ClassCondition
from ar.orders import OrderConfig, make_order
from conftest import cached_logits, tiny_model
from sampling import noise
from sampling.context import extend
from sampling.generate import generate
from sampling.settings import SamplingConfig
from sampling.guidance import cfg_scale_at

ORDERS = [("raster", {}), ("cell", {"cell": 1}), ("cell", {"cell": 2}), ("cell", {"cell": 4}),
          ("subsample", {"subsample": 2}), ("whole", {})]
IDS = [f"{o}{''.join(str(v) for v in kw.values())}" for o, kw in ORDERS]


def test_cell_and_subsample_layouts():
    cell = make_order(OrderConfig("cell", cell=2), 4, 6)
    assert cell.num_steps == 6 and cell.group_size == 4
    assert cell.perm[:8].tolist() == [0, 1, 6, 7, 2, 3, 8, 9]  # cell (0,0), then cell (0,1)
    sub = make_order(OrderConfig("subsample", subsample=2), 4, 4)
    assert sub.perm[:4].tolist() == [0, 2, 8, 10]  # offset (0, 0): every other row and column
    assert sub.perm[4:8].tolist() == [1, 3, 9, 11]  # offset (0, 1)
    for order in (cell, sub, make_order("whole", 3, 5), make_order("raster", 3, 5)):
        codes = torch.randint(0, 9, (2, order.grid_h, order.grid_w))
        assert torch.equal(order.to_grid(order.to_sequence(codes)), codes)
        rows, cols = order.coords()
        assert torch.equal(rows * order.grid_w + cols, order.perm)
    with pytest.raises(ValueError, match="model.order.cell=3 must divide"):
        make_order(OrderConfig("cell", cell=3), 4, 4)


@pytest.mark.parametrize("order, kw", ORDERS, ids=IDS)
def test_mask_follows_its_definition(order, kw):
    """Position p may attend q iff q is in the prefix, or q's step <= p's step (next-group),
    or q <= p (next-token). Checked entry by entry against the order's steps."""
    model = tiny_model(order=order, **kw)
    P, o = model.prefix, model.order
    mask = model.attention_mask()
    L = model.length
    full = mask if mask is not None else torch.ones(L, L).tril().bool()
    for p in range(L):
        for q in range(L):
            if model.inputs.kind == "next_token":
                want = q <= p
            else:
                step = lambda i: -1 if i < P else int(o.step_of[i - P])  # noqa: E731
                want = step(q) <= step(p)
            assert bool(full[p, q]) == want, (p, q)
    # one-token steps keep SDPA's plain causal path (raster; cell 1 with its single prefix token)
    assert (mask is None) == (o.group_size == 1)


@pytest.mark.parametrize("order, kw", ORDERS, ids=IDS)
@pytest.mark.parametrize("variant", [{}, {"cond_add": True, "cond_tokens": 2, "pos_embed": "learned"}])
def test_cached_decoding_equals_full_forward(order, kw, variant):
    model = tiny_model(order=order, **kw, **variant)
    seq = torch.randint(0, 32, (3, 16))
    cond = ClassCondition(torch.tensor([0, 2, 1])).with_null(model.cond.null)  # CFG rows
    rows = torch.cat([seq, seq])
    with torch.no_grad():
        full = model.head.logits(model.hidden(rows, cond))
    assert torch.allclose(full, cached_logits(model, rows, cond), atol=1e-5)


@pytest.mark.parametrize("order, kw", [("cell", {"cell": 2}), ("cell", {"cell": 4}),
                                       ("subsample", {"subsample": 2})], ids=["cell2", "cell4", "subsample2"])
def test_a_step_only_sees_earlier_steps(order, kw):
    """Changing the tokens of step s changes no prediction of steps <= s (their inputs are
    earlier steps' tokens), and does change step s + 1's."""
    model = tiny_model(order=order, grid=8, **kw)
    o = model.order
    seq = torch.randint(0, 32, (2, 64))
    cond = ClassCondition(torch.tensor([0, 1]))
    lo, hi = o.span(1)
    changed = seq.clone()
    changed[:, lo:hi] = (changed[:, lo:hi] + 1) % 32
    with torch.no_grad():
        a, b = model.hidden(seq, cond), model.hidden(changed, cond)
    assert torch.allclose(a[:, :hi], b[:, :hi], atol=1e-6)
    if o.num_steps > 2:
        assert not torch.allclose(a[:, hi:o.span(2)[1]], b[:, hi:o.span(2)[1]])


def test_group_draw_marginals_follow_the_head():
    """A whole-image step draws every position from its own distribution: per-position counts
    over 3,000 images against the head's probabilities (chi-square, 4 positions)."""
    model = tiny_model(order="whole", grid=2, vocab=8)
    n = 3000
    cond = ClassCondition(torch.zeros(n, dtype=torch.long))
    codes = model.order.to_sequence(generate(model, cond, torch.arange(n), 0, SamplingConfig()))
    with torch.no_grad():
        h = model.hidden(codes[:1], ClassCondition(cond.labels[:1]))  # the inputs of step 0: starts
        probs = model.head.probs(h, None, SamplingConfig())[0].double()  # (4, 8)
    for j in range(4):
        counts = torch.bincount(codes[:, j], minlength=8).double()
        expected = n * probs[j]
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 24.3, (j, chi2)  # 7 degrees of freedom: p = 0.001


def test_images_do_not_depend_on_the_batch_for_every_order():
    for order, kw in ORDERS[1:]:
        model = tiny_model(order=order, **kw)
        cond, ids = ClassCondition(torch.tensor([0, 1, 2])), torch.tensor([5, 6, 7])
        settings = SamplingConfig(cfg_scale=2.0, cfg_schedule="cosine")
        together = generate(model, cond, ids, 1, settings)
        apart = torch.cat([generate(model, ClassCondition(cond.labels[i:i + 1]), ids[i:i + 1], 1,
                                    settings) for i in range(3)])
        assert torch.equal(together, apart), order


def test_one_token_steps_keep_the_noise_of_each_sequence_index():
    """Raster draws use the same counters as before the step loop: uniform(keys, t, V)."""
    keys = noise.image_keys(3, torch.arange(4))
    group = noise.uniform_elements(keys, torch.tensor([7]), 32)[:, 0]
    assert torch.equal(group, noise.uniform(keys, 7, 32))


def test_compiled_extend_gives_the_same_tokens_on_cpu():
    model = tiny_model(order="cell", cell=2)
    cond, ids = ClassCondition(torch.tensor([0, 1])), torch.tensor([0, 1])
    settings = SamplingConfig(cfg_scale=1.5)
    eager = generate(model, cond, ids, 0, settings, extend)
    compiled = generate(model, cond, ids, 0, settings, torch.compile(extend, dynamic=False))
    assert torch.equal(eager, compiled)


def test_guidance_schedules_and_interval():
    total = 4
    assert [cfg_scale_at(3.0, "constant", s, total) for s in range(4)] == [3.0] * 4
    assert [cfg_scale_at(3.0, "linear", s, total) for s in range(4)] == [1.0, 1.5, 2.0, 2.5]
    assert [cfg_scale_at(3.0, "power", s, total, power=2.0) for s in range(4)] == \
        [1.0, 1.125, 1.5, 2.125]
    cos = [cfg_scale_at(3.0, "cosine", s, total) for s in range(4)]
    assert cos == pytest.approx([1.0 + (1 - math.cos(math.pi * s / 4)) for s in range(4)])
    # guidance only on the middle half of the steps
    assert [cfg_scale_at(3.0, "constant", s, total, interval=(0.25, 0.75)) for s in range(4)] == \
        [1.0, 3.0, 3.0, 1.0]


@pytest.mark.parametrize("name, size, rows_up, count", [("raster", 1, 1, 56), ("cell", 2, 2, 48),
                                                         ("cell", 4, 4, 32), ("subsample", 2, 1, 32)])
def test_above_is_an_earlier_element_straight_up_in_the_grid(name, size, rows_up, count):
    order = make_order(OrderConfig(name, cell=size, subsample=size), 8, 8)
    above, (rows, cols) = order.above(), order.coords()
    has = above >= 0
    assert has.sum() == count  # not the top grid rows (subsample: nor its first row of offsets)
    assert torch.equal(rows[above[has]], rows[has] - rows_up) and torch.equal(cols[above[has]], cols[has])
    assert (order.step_of[above[has]] < order.step_of[has]).all()  # drafted or committed before
    assert (make_order("whole", 8, 8).above() == -1).all()
