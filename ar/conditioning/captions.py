"""What the two caption conditions share (caption tokens, `caption_tokens.py`; a frozen
encoder's features, `caption_features.py`): the config section, the spec part copied from the
cache's text/meta.json, the cache's caption rows as a training source, the pooled caption on
every input, and prompts as grid rows.

The null condition is the empty caption (all padding, or the encoder's features of ""): a
buffer saved with the weights (filled from the cache's null.npy), so sampling needs no cache.
A prompt longer than the model's text length T is an error, not a silent cut: the model never
saw a caption cut mid-way, and a cut prompt would be sampled as another prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ar.conditioning.rows import TextCondition
from ar.data import read_sorted
from common.config import ConfigError, check_fields
from tokenizer.text import describe_caption


@dataclass
class TextConditionConfig:
    loss: float = 0.0  # caption tokens: weight of a loss on the caption's own tokens (0: image tokens only)
    pooled: bool = False  # also add the pooled caption to every image input (as model.class_condition.add does the class)

    def validate(self) -> None:
        check_fields(self, "model.text_condition.", {"loss": ">= 0"})


@dataclass
class TextSpec:
    """The caption side of a text-to-image generator, copied from the cache's text/meta.json.
    Empty (kind "") for class-conditional models."""

    kind: str = ""  # tokens (caption tokens in the sequence) | features (a frozen encoder's) | "" (no text)
    max_tokens: int = 0  # caption positions T before the image (captions left-padded)
    tokenizer: str = ""  # tokens: byte | bpe
    tokenizer_json: str = ""  # tokens, bpe: the trained caption tokenizer, so sampling needs no other file
    vocab_size: int = 0  # tokens: caption vocabulary, padding id 0 included
    channels: int = 0  # features: the encoder's width C
    encoder: str = ""  # features: the encoder folder the cache was made with (prompts are encoded with it)
    encoder_sha256: str = ""  # features: its weights' sha256, checked when sampling


class CaptionCache:
    """A cache's caption side (OUT/text/, tokenizer/text_cache.py), memory-mapped: caption
    tokens (N, T) or encoder features (N, T, C), one row per cached image, and the empty
    caption's row (`null`) that a dropped caption becomes."""

    def __init__(self, path: str | Path, count: int):
        from tokenizer.text_cache import REMAKE, TEXT_DIR, read_text_meta, text_files_problem

        self.meta = read_text_meta(path)  # named errors: no caption side, stale captions
        self.folder = folder = Path(path) / TEXT_DIR
        broken = text_files_problem(folder, self.meta)
        if broken is not None:
            raise ValueError(f"{broken}; {REMAKE}")
        self.kind, self.max_tokens = self.meta["kind"], int(self.meta["max_tokens"])
        self.rows = np.load(folder / ("tokens.npy" if self.kind == "tokens" else "features.npy"),
                            mmap_mode="r")
        self.null = np.load(folder / "null.npy")
        if len(self.rows) != count:
            raise ValueError(f"{folder} holds {len(self.rows)} captions for a cache of {count} "
                             f"images; {REMAKE}")

    def tokenizer_json(self) -> str:
        """The trained caption tokenizer (bpe), or "" (byte, features)."""
        file = (self.meta.get("tokenizer") or {}).get("file")
        return (self.folder / file).read_text() if file else ""

    def get(self, indices: np.ndarray, drop: np.ndarray) -> TextCondition:
        rows = read_sorted(self.rows, indices)
        rows[drop] = self.null
        dtype = np.int64 if self.kind == "tokens" else np.float32
        return TextCondition(torch.from_numpy(rows.astype(dtype)))


class CaptionSource:
    """The training side: each cached image's caption, the empty one where it is dropped."""

    # a caption describes the original image only ("at the top left" is wrong for its mirror
    # image): text models train on variant 0
    one_variant = True

    def __init__(self, codes: str, cache):
        self.captions = CaptionCache(codes, cache.count)

    def draw(self, indices, drop) -> TextCondition:
        return self.captions.get(indices, drop)

    def spec_fields(self) -> dict:
        c = self.captions
        m = c.meta
        tok, encoder = m.get("tokenizer") or {}, m.get("encoder") or {}
        return {"text": TextSpec(kind=m["kind"], max_tokens=c.max_tokens, tokenizer=tok.get("kind", ""),
                                 tokenizer_json=c.tokenizer_json(), vocab_size=tok.get("vocab_size", 0),
                                 channels=m.get("channels", 0), encoder=encoder.get("path", ""),
                                 encoder_sha256=encoder.get("sha256", ""))}

    def identity(self) -> dict:
        return {"text": {k: self.captions.meta[k] for k in ("kind", "max_tokens", "captions_sha256", "settings")}}

    def fill_null(self, embedder) -> None:
        """The empty caption, what dropped captions become (saved with the weights)."""
        embedder.null_text.copy_(torch.from_numpy(self.captions.null))


def too_long(prompt: str, count: int, limit: int) -> ValueError:
    return ValueError(f"prompt {describe_caption(prompt)} is {count} tokens, but the model reads "
                      f"at most {limit} (its text length, from its training captions): shorten "
                      f"the prompt; prompts are not cut")


class CaptionEmbedder(nn.Module):
    """The caption kinds' common part; a subclass embeds the caption (`embed`), encodes
    prompts (`prompt_rows`) and builds its tables. With `pooled`, the mean of the caption's
    embeddings (its non-padding rows) through a Linear is added to every image input, as the
    class embedding is for class models: a bag of words every position reads without attending
    to the caption (cf. the pooled text vector of SDXL and Imagen)."""

    config_field = "text_condition"
    rows_name = "prompts"
    vector_table = None  # no adaLN vector from a caption
    loss_weight = 0.0

    @staticmethod
    def validate(m, input_kind: str) -> None:
        """A caption enters as prefix tokens (and, pooled, into every input): there is no
        class vector to drive adaLN."""
        for name, on in (("model.backbone.adaln", m.backbone.adaln),
                         ("model.class_condition.prefix=vector", m.class_condition.prefix == "vector")):
            if on:
                raise ConfigError(f"{name} needs a class vector; model.condition=text conditions "
                                  f"on the caption's prefix tokens only: turn it off")

    @staticmethod
    def source(codes: str, cache) -> CaptionSource:
        return CaptionSource(codes, cache)

    def initialize(self) -> None:
        """Its tables keep the model's N(0, 0.02) unless a kind says otherwise."""

    @property
    def null(self) -> torch.Tensor:
        """The empty caption's row: (T,) tokens or (T, C) features."""
        return self.null_text

    def input_table(self) -> None:
        return None  # the pooled caption is the embedder's own (`pool`)

    def input_vector(self, cond: TextCondition, table=None) -> torch.Tensor | None:
        """The pooled caption (B, 1, D) added to every input, or None without `pooled`."""
        if self.pool is None:
            return None
        x, present = self.pool_rows(cond)  # (B, T, D), (B, T)
        weights = present.to(x.dtype)[..., None]  # (B, T, 1): padding rows count for nothing
        mean = (x * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
        return self.pool(mean)  # (B, 1, D); the empty caption pools to 0, then the bias

    def check_length(self, prompts: list[str], counts) -> None:
        for prompt, count in zip(prompts, counts):
            if count > self.num_tokens:
                raise too_long(prompt, count, self.num_tokens)

    # ------------------------------------------------------------ rows of a grid or a run

    def grid_rows(self, classes: list[int] | None, prompts: list[str] | None, device,
                  log=None, text_encoder: str | None = None, **_) -> tuple[TextCondition, list[str]]:
        """(one condition per prompt, the prompts); classes are refused."""
        if classes is not None:
            raise ValueError(f"classes={classes}: this generator is text-to-image, it has no "
                             f"classes; give prompt=\"...\" or prompts=FILE instead")
        if not prompts:
            raise ValueError("this generator is text-to-image: give prompt=\"...\" or "
                             "prompts=FILE (one prompt a line); the empty caption (unconditional "
                             "samples) is prompt='\"\"'")
        rows = self.prompt_rows(prompts, device, text_encoder=text_encoder, log=log)
        if "" in prompts and log is not None:  # allowed: the only way to unconditional samples
            log.warning('prompt "" is the empty caption, the null condition: these are unconditional '
                        'samples (what the generator learned from the captions train.cond_dropout '
                        'dropped), and guidance has no effect on them')
        return rows, list(prompts)

    all_rows = grid_rows  # images mode: image i gets prompt i % prompts

    @staticmethod
    def check_rows(spec, classes: list[int] | None, prompts: list[str] | None, key: str) -> None:
        if classes:
            raise ConfigError(f"{key}={classes}: this model is text-to-image, its grid rows are "
                              f"grid.prompts (or 8 of the cache's captions)")

    @staticmethod
    def training_rows(spec, codes: str, classes, prompts: list[str] | None):
        """The rows of a training run's grid: grid.prompts, or 8 captions spread over the cache."""
        if prompts:
            return None, list(prompts)
        from tokenizer.text_cache import read_captions

        captions = read_captions(Path(codes))
        return None, [captions[i * len(captions) // 8] for i in range(min(8, len(captions)))]

    @staticmethod
    def missing(spec) -> str | None:
        return None
