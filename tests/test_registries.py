"""A new part is one file plus one registry line. Each toy below is written as a user's own file
would be (an order, a condition kind, a sampler), registered with one line, and then runs
through the shared code untouched: config validation, training, the KV cache, sampling."""

from dataclasses import replace

import pytest
import torch
from torch import nn

import train_gen
from ar.checkpoint import load_generator
from ar.conditioning import CONDITIONS, ClassCondition
from ar.orders import CPU, ORDERS, Order
from common.config import load_config
from conftest import cached_logits, make_code_cache, model_config, tiny_model
from sampling.generate import SAMPLERS, Sampler, generate, sample_codes
from sampling.plain import plain_loop
from sampling.run import SampleRunConfig
from sampling.settings import SamplingConfig


class ReverseRasterOrder(Order):
    """A toy order: raster from the last token back to the first, one token per step."""

    name = "reverse"

    def layout(self):
        return torch.arange(self.num_tokens - 1, -1, -1, device=CPU), [1] * self.num_tokens


class _NoSource:
    """The toy condition's training side: nothing to read from the cache."""

    one_variant = False

    def __init__(self, cache):
        self.cache = cache

    def draw(self, indices, drop) -> ClassCondition:
        return ClassCondition(torch.zeros(len(indices), dtype=torch.long))

    def spec_fields(self) -> dict:
        return {}

    def identity(self) -> dict:
        return {}

    def fill_null(self, embedder) -> None:
        pass


class Unconditional(nn.Module):
    """A toy condition kind: none at all, one learned start token (the null is the same row)."""

    config_field = None
    rows_name = "classes"
    loss_weight = 0.0
    vector_table = None
    null = 0

    def __init__(self, spec, dim: int):
        super().__init__()
        self.spec, self.num_tokens = spec, 1
        self.start = nn.Parameter(torch.zeros(1, 1, dim))

    @staticmethod
    def validate(m, input_kind: str) -> None:
        pass

    @staticmethod
    def source(codes: str, cache) -> _NoSource:
        return _NoSource(cache)

    def initialize(self) -> None:
        nn.init.normal_(self.start, std=0.02)

    def input_table(self) -> None:
        return None

    def forward(self, cond: ClassCondition) -> torch.Tensor:
        return self.start.expand(len(cond), -1, -1)  # (B, 1, D)

    def input_vector(self, cond, table) -> None:
        return None

    def grid_rows(self, classes, prompts, device, **_):
        return ClassCondition(torch.zeros(1, dtype=torch.long, device=device)), ["unconditional"]

    all_rows = grid_rows

    @staticmethod
    def check_rows(spec, classes, prompts, key: str) -> None:
        pass

    @staticmethod
    def training_rows(spec, codes, classes, prompts):
        return None, None

    @staticmethod
    def missing(spec) -> None:
        return None


def greedy_loop(ctx):
    """A toy sampler: plain sampling's loop at temperature 0, whatever the settings say."""
    return plain_loop(replace(ctx, settings=replace(ctx.settings, temperature=0.0)))


def test_a_new_order_is_one_class_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(ORDERS, "reverse", ReverseRasterOrder)
    model_config(order="reverse", inputs="next_token").validate()
    model = tiny_model(order="reverse", inputs="next_token")
    seq = torch.randint(0, 32, (2, 16))
    cond = ClassCondition(torch.tensor([0, 2]))
    full = model.head.logits(model.hidden(seq, cond))
    assert torch.allclose(cached_logits(model, seq, cond), full, atol=1e-5)
    grid = generate(model, cond, torch.arange(2), 0, SamplingConfig(temperature=0.0))
    first = model.head.logits(model.prefill(cond)[0][:, -1:]).argmax(-1)  # token 0 of the order ...
    assert torch.equal(grid.flatten(1)[:, -1:], first)  # ... is the grid's last


def test_a_new_condition_kind_trains_and_samples_through_the_shared_code(tmp_path, monkeypatch):
    monkeypatch.setitem(CONDITIONS, "unconditional", Unconditional)
    codes = make_code_cache(tmp_path / "codes", n=16)
    cfg = load_config(train_gen.RunConfig, overrides=[
        f"out_dir={tmp_path / 'run'}", f"data.codes={codes}", "model.condition=unconditional",
        "model.size=debug", "train.global_batch=4", "train.max_steps=2", "train.log_every=1",
        "train.device=cpu", "train.precision=fp32"])
    last = train_gen.main(cfg)
    assert last["step"] == 2 and last["loss"] > 0
    model = load_generator(tmp_path / "run" / "weights" / "ema.safetensors")
    assert isinstance(model.cond, Unconditional) and model.prefix == 1
    rows, names = model.cond.grid_rows(None, None, "cpu")
    grid = generate(model, rows.repeat_rows(3), torch.arange(3), 0, SamplingConfig(cfg_scale=2.0))
    assert grid.shape == (3, 4, 4) and names == ["unconditional"]


def test_a_new_sampler_is_one_function_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(SAMPLERS, "greedy", Sampler(greedy_loop))
    load_config(SampleRunConfig, overrides=["weights=w.safetensors", "out=o.png", "sampler=greedy"])
    model, cond, ids = tiny_model(), ClassCondition(torch.tensor([0, 1, 2])), torch.arange(3)
    codes, cost = sample_codes(model, cond, ids, 7, SamplingConfig(cfg_scale=1.5), "greedy")
    assert torch.equal(codes, generate(model, cond, ids, 7, SamplingConfig(cfg_scale=1.5, temperature=0.0)))
    assert cost.passes == 3 * 15  # 16 tokens, the first from the prefill
    with pytest.raises(ValueError, match="sampler='beam'"):
        sample_codes(model, cond, ids, 7, SamplingConfig(), "beam")
