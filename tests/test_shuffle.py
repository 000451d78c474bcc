"""Token-Shuffle (model.inputs=shuffle): a step's G = s x s tokens share one position."""

import pytest
import torch

from ar.conditioning import ClassCondition, TextCondition
from ar.model import ARModel
from conftest import cached_logits, tiny_model, tiny_text_spec
from sampling.generate import generate
from sampling.settings import SamplingConfig
from sampling.generate import sampler_for


def _informative(model: ARModel) -> ARModel:
    """Random (not zero) residual branches, so the fuse and unshuffle blocks do something."""
    torch.manual_seed(1)
    for p in model.inputs.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model


def test_s1_is_exactly_the_next_token_model():
    base = tiny_model(grid=4)
    shuffled = tiny_model(grid=4, inputs="shuffle")  # raster order: steps of one token
    assert set(base.state_dict()) == set(shuffled.state_dict())  # no fuse parameters at s = 1
    shuffled.load_state_dict(base.state_dict())
    codes = torch.randint(0, 32, (3, 4, 4))
    cond = ClassCondition(torch.tensor([0, 1, 2]))
    assert torch.equal(base(codes, cond)["loss"], shuffled(codes, cond)["loss"])
    settings = SamplingConfig(cfg_scale=2.0, top_k=8)
    ids = torch.arange(3)
    assert torch.equal(generate(base, cond, ids, 0, settings), generate(shuffled, cond, ids, 0, settings))


@pytest.mark.parametrize("grid,s", [(4, 2), (8, 2), (8, 4)])
def test_fewer_positions_and_cached_decoding_equals_the_full_forward(grid, s):
    model = _informative(tiny_model(grid=grid, inputs="shuffle", order="cell", cell=s).eval())
    steps = (grid // s) ** 2
    assert model.length == model.prefix + steps - 1  # grid^2 tokens in steps positions
    seq = torch.randint(0, 32, (2, grid * grid))
    cond = ClassCondition(torch.tensor([0, 2])).with_null(model.cond.null)
    seq = torch.cat([seq, seq])
    full = model.head.logits(model.hidden(seq, cond))  # (B, N, V)
    assert torch.allclose(full, cached_logits(model, seq, cond), atol=1e-5)


def test_unshuffle_gives_each_token_of_a_window_its_own_prediction():
    model = _informative(tiny_model(grid=4, inputs="shuffle", order="cell", cell=2).eval())
    seq = torch.randint(0, 32, (1, 16))
    logits = model.head.logits(model.hidden(seq, ClassCondition(torch.tensor([1]))))  # (1, 16, V)
    window = logits[0, :4]  # the four tokens of step 0, drawn from one position
    assert not torch.allclose(window[0], window[1]) and not torch.allclose(window[2], window[3])


def test_training_reaches_the_fuse_and_unshuffle_and_works_with_text():
    spec = tiny_text_spec(grid=4, inputs="shuffle", order="cell", cell=2)
    model = ARModel(spec)
    torch.nn.init.normal_(model.head.output.weight, std=0.5)  # a zero head passes no gradient back
    text = TextCondition(torch.randint(0, 20, (3, 5)))
    model(torch.randint(0, 32, (3, 4, 4)), text)["loss"].backward()
    for name in ("compress", "expand"):
        part = model.inputs.fuse.compress if name == "compress" else model.inputs.unshuffle.expand
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0, name
    codes = generate(model.eval(), text, torch.arange(3), 0, SamplingConfig(cfg_scale=3.0))
    assert codes.shape == (3, 4, 4)


def test_bad_shapes_and_speculative_decoding_are_refused_by_name():
    with pytest.raises(ValueError, match="divisible by 16"):
        tiny_model(grid=8, inputs="shuffle", order="cell", cell=4, dim=72, n_head=2)
    model = tiny_model(grid=4, inputs="shuffle", order="cell", cell=2)
    with pytest.raises(ValueError, match="shuffle"):
        sampler_for("sjd", model)
