"""Shared test helpers: tiny models and paths. Everything runs on CPU in seconds."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "llamagen"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ar.model import ARModel, GeneratorSpec, ModelConfig  # noqa: E402

# keep subprocess-based tests (torchrun) from oversubscribing the 2-core CI machine
os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_spec(vocab: int = 32, grid: int = 4, classes: int = 3, **model_kw) -> GeneratorSpec:
    kw = dict(size="debug", token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    kw.update(model_kw)
    return GeneratorSpec(model=ModelConfig(**kw), vocab_size=vocab, grid_h=grid, grid_w=grid,
                         num_classes=classes, class_names=[f"c{i}" for i in range(classes)],
                         resolution=grid * 4)


def tiny_model(seed: int = 0, **kw) -> ARModel:
    """A debug-size model with a random (not zero) output layer, so logits are informative."""
    torch.manual_seed(seed)
    model = ARModel(tiny_spec(**kw)).eval()
    torch.nn.init.normal_(model.head.output.weight, std=0.5)
    return model


@pytest.fixture
def model() -> ARModel:
    return tiny_model()
