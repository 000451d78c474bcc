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

from ar.conditioning import TextSpec  # noqa: E402
from ar.config import GeneratorSpec, ModelConfig  # noqa: E402
from ar.model import ARModel  # noqa: E402

# keep subprocess-based tests (torchrun) from oversubscribing the 2-core CI machine
os.environ.setdefault("OMP_NUM_THREADS", "1")


def model_config(**kw) -> ModelConfig:
    """A ModelConfig from keywords, the flat keys of earlier versions (order="cell", cell=2,
    cond_tokens=0, ...) read as a config file's are."""
    import dataclasses
    import typing

    ModelConfig.upgrade_legacy(kw)
    hints = typing.get_type_hints(ModelConfig)
    for f in dataclasses.fields(ModelConfig):
        if isinstance(kw.get(f.name), dict):
            kw[f.name] = hints[f.name](**kw[f.name])
    return ModelConfig(**kw)


def tiny_spec(vocab: int = 32, grid: int = 4, classes: int = 3, **model_kw) -> GeneratorSpec:
    kw = dict(size="debug", token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0)
    kw.update(model_kw)
    return GeneratorSpec(model=model_config(**kw), vocab_size=vocab, grid_h=grid, grid_w=grid,
                         num_classes=classes, class_names=[f"c{i}" for i in range(classes)],
                         resolution=grid * 4)


def tiny_text_spec(kind: str = "tokens", max_tokens: int = 5, text_vocab: int = 20,
                   channels: int = 8, **kw) -> GeneratorSpec:
    """tiny_spec for a text-to-image model: caption tokens (byte-tokenizer ids below
    `text_vocab`) or encoder features of width `channels`, T = max_tokens."""
    spec = tiny_spec(condition="text", **kw)
    spec.text = TextSpec(kind=kind, max_tokens=max_tokens, tokenizer="byte" if kind == "tokens" else "",
                         vocab_size=text_vocab if kind == "tokens" else 0,
                         channels=channels if kind == "features" else 0)
    return spec


def tiny_model(seed: int = 0, **kw) -> ARModel:
    """A debug-size model with a random (not zero) output layer, so logits are informative."""
    torch.manual_seed(seed)
    model = ARModel(tiny_spec(**kw)).eval()
    torch.nn.init.normal_(model.head.output.weight, std=0.5)
    return model


@torch.no_grad()
def cached_logits(model: ARModel, seq: torch.Tensor, cond) -> torch.Tensor:
    """Logits (B, N, V) of a teacher-forced sequence through the KV cache, step by step as
    sampling.generate feeds it: what must equal the full forward pass."""
    order, rows = model.order, len(cond)
    model.setup_cache(rows)
    h, vector = model.prefill(cond)
    ada = model.modulation(cond)
    steps = []
    for s in range(order.num_steps):
        fed = model.inputs.step(model, s, seq, vector, rows)
        if fed is not None:
            h = model.extend(*fed, ada)
        lo, hi = order.span(s)
        steps.append(model.head.logits(model.inputs.draw_states(h, hi - lo)))
    return torch.cat(steps, dim=1)


@pytest.fixture
def model() -> ARModel:
    return tiny_model()


def make_image_folder(root: Path, size: int, classes=("cat", "dog"), per_class: int = 4,
                      seed: int = 0) -> Path:
    """Class folders of random (asymmetric, so flips differ) size x size PNGs; another seed
    gives other images under the same names."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def make_code_cache(path: Path, n: int = 48, grid: int = 4, vocab: int = 32, classes: int = 3,
                    shard_size: int = 20, tokenizer_path: str = "", tokenizer_sha: str = "") -> Path:
    """A code cache in the format `python -m tokenizer.encode` writes, with learnable codes:
    every image of class c is the same grid (plus one random token), flipped = mirrored."""
    import json

    import numpy as np

    from tokenizer.cache import make_meta, shard_name

    rng = np.random.default_rng(0)
    protos = rng.integers(0, vocab, (classes, grid, grid))
    labels = np.arange(n) % classes
    codes = protos[labels].copy()
    codes[np.arange(n), rng.integers(0, grid, n), rng.integers(0, grid, n)] = rng.integers(0, vocab, n)
    both = np.stack([codes, codes[:, :, ::-1]], axis=1).reshape(n, 2, grid * grid).astype(np.uint16)
    path.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, start in enumerate(range(0, n, shard_size)):
        sl = slice(start, min(n, start + shard_size))
        codes_file, labels_file = shard_name(k)
        np.save(path / codes_file, both[sl])
        np.save(path / labels_file, labels[sl].astype(np.int64))
        shards.append({"codes": codes_file, "labels": labels_file, "count": sl.stop - sl.start})
    tok = {"name": "vq", "path": tokenizer_path, "sha256": tokenizer_sha, "config": {}}
    meta = make_meta(tok, grid * 4, (grid, grid), {"kind": "discrete", "codebook_size": vocab}, labels, [f"c{i}" for i in range(classes)],
                     shards, False, str(path), [])
    (path / "meta.json").write_text(json.dumps(meta))
    return path


def tiny_kl(folder: Path) -> Path:
    """A random KL tokenizer saved as FOLDER/kl.safetensors: 16-px images -> 4x4 latents of 4
    channels (the flow tests' tokenizer)."""
    from tokenizer import save_tokenizer
    from tokenizer.kl import KLConfig, KLModel

    cfg = KLConfig(block_out_channels=[32, 32, 32], layers_per_block=1, latent_channels=4,
                   encoder_attention=[], latent_scale=0.5)
    torch.manual_seed(0)
    model = KLModel(cfg)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return save_tokenizer(model, cfg, folder / "kl.safetensors")
