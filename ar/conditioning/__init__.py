"""What the model is conditioned on: a registry of condition kinds, one entry each.

    class          LabelEmbedder (label.py): class ids -> prefix tokens and/or an adaLN vector,
                   optionally a class embedding on every input; the null is an extra class id
    text_tokens    CaptionTokens (caption_tokens.py): the caption's tokens in the sequence
    text_features  CaptionFeatures (caption_features.py): a frozen encoder's features as prefix
`model.condition` names an entry; `text` picks the caption kind the cache holds
(`tokenizer.encode text.kind=...`). A condition batch is a `rows.py` object (ClassCondition,
TextCondition) with its null rows for CFG (`with_null`).

An entry is an nn.Module class built as `Entry(spec, dim)` that answers every question shared
code asks about conditions, so that nothing outside this package asks which kind it is:
    config_field            its section of the model config (e.g. model.class_condition)
    rows_name               what a grid row is ("classes", "prompts")
    validate(m, inputs)     its rules against the rest of the model config
    source(codes, cache)    the training side: `draw(indices, drop)` a batch's conditions (the
                            null where dropped), `one_variant` (train on unflipped images only),
                            `spec_fields()` (its part of the GeneratorSpec), `identity()` (its
                            part of the run identity), `fill_null(embedder)`
    num_tokens, null        prefix length P, the null condition's row
    forward(cond)           prefix embeddings (B, P, D); vector_table / vector(cond): the adaLN
                            vector; input_table() / input_vector(cond, table): a vector added to
                            every input; loss_weight / loss(h, cond): a loss on the prefix
    grid_rows / all_rows    grid rows (classes, prompts) -> (conditions, names)
    check_rows, training_rows, missing   a training run's grid rows, checked up front
Training replaces conditions by the null with probability `train.cond_dropout` (the data
stream's choice, so that it depends on the sample and not on the number of processes).
"""

from __future__ import annotations

from ar.conditioning.caption_features import CaptionFeatures
from ar.conditioning.caption_tokens import CaptionTokens
from ar.conditioning.captions import TextConditionConfig, TextSpec
from ar.conditioning.label import ClassConditionConfig, LabelEmbedder
from ar.conditioning.rows import ClassCondition, Condition, TextCondition

CONDITIONS = {"class": LabelEmbedder, "text_tokens": CaptionTokens, "text_features": CaptionFeatures}
TEXT = "text"  # model.condition=text: the caption kind of the cache (text_tokens | text_features)


def condition_entry(name: str, text_kind: str = ""):
    """The entry for `model.condition` (`text` resolved by the cache's caption kind; before
    the cache is read, text's rules are the caption kinds' common ones)."""
    if name == TEXT:
        return CONDITIONS[f"text_{text_kind or 'tokens'}"]
    return CONDITIONS[name]


def spec_entry(spec):
    """The entry a GeneratorSpec's model is built with."""
    if spec.model.condition == TEXT and not spec.text.kind:
        raise ValueError("model.condition=text, but the spec has no caption side (spec.text); "
                         "train on a cache encoded with text.kind=...")
    return condition_entry(spec.model.condition, spec.text.kind)


__all__ = ["CONDITIONS", "TEXT", "CaptionFeatures", "CaptionTokens", "ClassCondition",
           "ClassConditionConfig", "Condition", "LabelEmbedder", "TextCondition",
           "TextConditionConfig", "TextSpec", "condition_entry", "spec_entry"]
