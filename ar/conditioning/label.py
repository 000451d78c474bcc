"""The class condition: labels -> prefix tokens (LlamaGen's `cls_embedding`) and/or an adaLN
vector (xAR's, VAR's `class_emb`), optionally a class embedding on every input. The null class
(id `num_classes`, an extra row of every table) is the unconditional input of CFG."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ar.conditioning.rows import ClassCondition
from common.config import ConfigError, check_fields


@dataclass
class ClassConditionConfig:
    tokens: int = 1  # prefix tokens the class occupies (0: none, the class enters by adaLN; next_scale: the first scale's tokens)
    prefix: str = "table"  # the prefix's embedding: table (its own, LlamaGen) | vector (the adaLN class vector repeated, VAR's start token)
    add: bool = False  # also add a class embedding to every token input (not in LlamaGen; a stronger signal for small models)

    def validate(self) -> None:
        check_fields(self, "model.class_condition.", {"tokens": ">= 0", "prefix": ("table", "vector")})


class LabelSource:
    """The training side: a cached image's label, the null class where the condition is
    dropped; both flips of an image share it."""

    one_variant = False  # an image and its mirror have the same class

    def __init__(self, cache):
        self.cache = cache

    def draw(self, indices, drop) -> ClassCondition:
        labels = self.cache.labels[indices].copy()
        labels[drop] = self.cache.num_classes  # the null class
        return ClassCondition(torch.from_numpy(labels))

    def spec_fields(self) -> dict:
        return {}  # the class count and names come with every cache

    def identity(self) -> dict:
        return {}

    def fill_null(self, embedder) -> None:
        pass  # the null class is a row of the tables, learned


class LabelEmbedder(nn.Module):
    """Class labels -> prefix tokens and/or an adaLN vector; with `prefix: vector`, the prefix
    is the adaLN vector itself (VAR's class_emb serves both)."""

    config_field = "class_condition"  # its section of the model config
    rows_name = "classes"  # what a grid row is
    loss_weight = 0.0  # a class prefix has no tokens of its own to predict

    def __init__(self, spec, dim: int):
        super().__init__()
        c = spec.model.class_condition
        self.spec, self.num_classes, self.num_tokens, self.dim = spec, spec.num_classes, c.tokens, dim
        # one extra row in each table: the null class of the unconditional CFG branch
        own_table = c.tokens and c.prefix != "vector"  # vector: the prefix repeats the class vector
        self.embedding_table = nn.Embedding(spec.num_classes + 1, c.tokens * dim) if own_table else None
        self.vector_table = nn.Embedding(spec.num_classes + 1, dim) if spec.model.backbone.adaln else None

    @staticmethod
    def validate(m, input_kind: str) -> None:
        c = m.class_condition
        if m.text_condition.loss:
            raise ConfigError("model.text_condition.loss needs model.condition=text (a caption to predict)")
        if c.tokens == 0 and not m.backbone.adaln:
            raise ConfigError("model.class_condition.tokens=0 leaves the class no way in: set "
                              "model.backbone.adaln=true, or tokens >= 1")
        if c.prefix == "vector" and not m.backbone.adaln:
            raise ConfigError("model.class_condition.prefix=vector repeats the adaLN class vector: "
                              "it needs model.backbone.adaln=true")
        if c.tokens == 0 and input_kind == "next_token":
            raise ConfigError("model.inputs.name=next_token predicts token 0 from the last prefix "
                              "position: it needs model.class_condition.tokens >= 1")

    @staticmethod
    def source(codes: str, cache) -> LabelSource:
        return LabelSource(cache)

    def initialize(self) -> None:
        """Its tables keep the model's N(0, 0.02)."""

    @property
    def null(self) -> int:
        """The null class id (the unconditional CFG input)."""
        return self.num_classes

    def input_table(self) -> nn.Embedding | None:
        """(num_classes + 1, D): the label's embedding added to every input (`add`), null row
        included. The model holds it (its weights are `cond_add.weight`)."""
        return nn.Embedding(self.num_classes + 1, self.dim) if self.spec.model.class_condition.add else None

    def forward(self, cond: ClassCondition) -> torch.Tensor:
        """Prefix embeddings (B, P, D); P = 0 gives an empty prefix."""
        if self.embedding_table is None:  # no prefix, or the class vector repeated P times
            return self.vector(cond).expand(len(cond), self.num_tokens, self.dim)
        return self.embedding_table(cond.labels).view(len(cond), self.num_tokens, self.dim)

    def vector(self, cond: ClassCondition) -> torch.Tensor:
        """The adaLN conditioning vector (B, 1, D)."""
        return self.vector_table(cond.labels)[:, None]

    def input_vector(self, cond: ClassCondition, table: nn.Embedding | None) -> torch.Tensor | None:
        """The vector (B, 1, D) added to every input: the label's row of the model's table."""
        return None if table is None else table(cond.labels)[:, None]

    # ------------------------------------------------------------ rows of a grid or a run

    def grid_rows(self, classes: list[int] | None, prompts: list[str] | None, device,
                  key: str = "classes", **_) -> tuple[ClassCondition, list[str]]:
        """(one condition per grid row, the rows' names): the class ids (None: the first
        classes, at most 32); `key` names the ids' setting in errors."""
        if prompts:
            raise ValueError("prompt/prompts given, but this generator is class-conditional: use "
                             "classes=[...]")
        classes = classes or list(range(min(self.num_classes, 32)))
        check_class_ids(self.spec, classes, key)
        return ClassCondition(torch.tensor(classes, device=device)), [self.spec.class_names[c] for c in classes]

    def all_rows(self, classes: list[int] | None, prompts: list[str] | None, device, **kw):
        """Images mode: every class is a row (image i gets one of them)."""
        return self.grid_rows(list(range(self.num_classes)), prompts, device, **kw)

    @staticmethod
    def check_rows(spec, classes: list[int] | None, prompts: list[str] | None, key: str) -> None:
        """Rows asked for in a config, checked before a long job rather than at its end."""
        if classes:
            check_class_ids(spec, classes, key)

    @staticmethod
    def training_rows(spec, codes: str, classes: list[int] | None, prompts: list[str] | None):
        """The rows of a training run's grid: grid.classes, or the first 16 classes."""
        return classes or list(range(min(spec.num_classes, 16))), None

    @staticmethod
    def missing(spec) -> str | None:
        return None  # a class model samples with its weights alone


def check_class_ids(spec, classes: list[int], key: str = "classes") -> None:
    """Refuse an id the generator has no class for, naming the classes it has (one past the
    last is the null class: sampled, it would give unconditional samples under a class name)."""
    count = spec.num_classes
    bad = [c for c in classes if not 0 <= c < count]
    if bad:
        todo = f"pass ids 0-{count - 1}" if count else f"leave {key} out"
        raise ValueError(f"{key}={classes}: no class {bad[0]}; this generator has {count} classes "
                         f"{class_names_hint(spec.class_names)}: {todo}")


def class_names_hint(names: list[str]) -> str:
    """The class names for a message: all of a few, the first and last of many. A converter's
    placeholders ("class 7") are no names."""
    if not names or names == [f"class {i}" for i in range(len(names))]:
        return "(the weights carry no class names; a converter's class_names=FILE adds them)"
    shown = [f"{i} {name}" for i, name in enumerate(names)]
    if len(shown) <= 16:
        return f"({', '.join(shown)})"
    return (f"({', '.join(shown[:8])}, ..., {shown[-1]}; all of them: "
            f"ar.checkpoint.load_generator(WEIGHTS).spec.class_names)")
