"""The one training stack: the tokenizer trainer's learning rate is the generator's schedule
(common/schedule.py) and gives the same floats as its own formula did, at every step of every
tokenizer config; the per-rank seed rule keeps each trainer's seeds."""

from __future__ import annotations

import math

import pytest

from common.config import load_config
from common.dist import rank_seed
from conftest import ROOT
from tokenizer.train import step_lr
from tokenizer.train_config import schema_for

TOKENIZER_CONFIGS = sorted((ROOT / "configs" / "tokenizer").glob("*.yaml"))


def old_tokenizer_lr(t, step: int) -> float:
    """tokenizer/train.py's lr_at before it used the generator's schedule (commit a6ff007)."""
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    if t.schedule == "cosine":
        frac = (step - t.warmup) / max(1, t.steps - t.warmup)
        return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
    return t.lr


# as shipped, then each config with the other branches: no warm-up, and the other schedule
@pytest.mark.parametrize("overrides", [[], ["train.warmup=0"], ["train.schedule=cosine"],
                                       ["train.schedule=constant"]], ids=["shipped", "no-warmup",
                                                                          "cosine", "constant"])
@pytest.mark.parametrize("path", TOKENIZER_CONFIGS, ids=[p.stem for p in TOKENIZER_CONFIGS])
def test_tokenizer_lr_equals_its_old_formula_bit_for_bit(path, overrides):
    args = ["--config", str(path), *overrides]
    t = load_config(schema_for(args), [path], overrides).train
    assert t.min_lr_ratio == 0.1  # the old formula's floor, now a setting
    for step in range(t.steps):
        assert step_lr(t, step) == old_tokenizer_lr(t, step), (path.name, overrides, step)


def test_rank_seed_keeps_each_trainers_formula():
    for seed, rank, world, start in [(0, 0, 1, 0), (3, 1, 2, 200), (12345, 7, 8, 99999)]:
        assert rank_seed(seed, rank, stride=world, offset=1) == seed * world + rank + 1  # train_gen
        assert rank_seed(seed, rank, stride=7919, offset=start * 31) == \
            seed * 7919 + start * 31 + rank  # tokenizer/train.py, as at commit a6ff007
