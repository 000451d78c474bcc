"""Prompts -> the conditions of a text-to-image generator, and the grid rows of any generator.

A prompt is tokenized exactly as the training captions were: with the caption tokenizer stored
in the weights (caption tokens), or with the frozen text encoder the cache was made with
(features; the folder recorded in the weights, or `text_encoder=FOLDER`). A prompt longer than
the model's text length T is an error, not a silent cut: the model never saw a caption cut
mid-way unless its cache said so, and a cut prompt would be sampled as another prompt.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from ar.conditioning import ClassCondition, TextCondition
from tokenizer.text import CaptionTokenizer, describe_caption, left_pad


_PROMPT_FILE = "a text file with one prompt a line, or a captions.jsonl"


def read_prompts(path: str | Path) -> list[str]:
    """One prompt a line (blank lines skipped), or a captions.jsonl: the "caption" of each
    line, so a dataset's held-out captions can be sampled as they are."""
    path = Path(path)
    if path.is_dir():
        inside = path / "captions.jsonl"
        what = f"its captions: prompts={inside}" if inside.is_file() else _PROMPT_FILE
        raise ValueError(f"prompts={path} is a folder; pass {what}")
    if not path.is_file():
        raise FileNotFoundError(f"prompts={path} not found; pass {_PROMPT_FILE}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"prompts={path} is not UTF-8 text (byte {e.start} is "
                         f"0x{e.object[e.start]:02x}); pass {_PROMPT_FILE}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        lines = [_caption_of(line, path, number) for number, line in enumerate(lines, start=1)]
    if not lines:
        raise ValueError(f"prompts={path} holds no prompt; write one prompt a line")
    return lines


def _caption_of(line: str, path: Path, number: int) -> str:
    try:
        caption = json.loads(line)["caption"]
        if isinstance(caption, str):
            return caption.strip()
    except (ValueError, KeyError, TypeError):
        pass
    raise ValueError(f"{path} line {number}: expected a JSON object with a \"caption\" string "
                     f"(the captions.jsonl layout)")


def _too_long(prompt: str, count: int, limit: int) -> ValueError:
    return ValueError(f"prompt {describe_caption(prompt)} is {count} tokens, but the model reads "
                      f"at most {limit} (its text length, from its training captions): shorten "
                      f"the prompt; prompts are not cut")


@functools.lru_cache(maxsize=2)
def _caption_tokenizer(kind: str, state: str) -> CaptionTokenizer:
    return CaptionTokenizer(kind, state)


@functools.lru_cache(maxsize=1)
def _encoder(path: str, device: str):
    from tokenizer.text_encoder import load_text_encoder

    return load_text_encoder(path, device=device)


def text_encoder_for(spec, override: str | None, log=None):
    """The frozen encoder that turns prompts into features: `override` or the recorded folder;
    another encoder than the training one is refused unless given explicitly (then a warning)."""
    path = override or spec.text.encoder
    encoder = _encoder(str(path), "cpu")
    if encoder.identity().get("sha256") != spec.text.encoder_sha256:
        msg = (f"text encoder {path} is not the one the generator was trained with "
               f"(sha256 differs)")
        if override is None:
            raise ValueError(msg + "; pass text_encoder=FOLDER to use it anyway")
        if log:
            log.warning(msg)
    return encoder


def prompt_condition(model, prompts: list[str], device, encoder=None) -> TextCondition:
    """TextCondition (B, T) or (B, T, C) for the prompts, as the model was trained on."""
    text = model.spec.text
    limit = text.max_tokens
    if text.kind == "tokens":
        rows = _caption_tokenizer(text.tokenizer, text.tokenizer_json).encode_batch(prompts)
        for prompt, ids in zip(prompts, rows):
            if len(ids) > limit:
                raise _too_long(prompt, len(ids), limit)
        return TextCondition(torch.from_numpy(left_pad(rows, limit)).long().to(device))
    encoder = encoder or text_encoder_for(model.spec, None)
    for prompt, count in zip(prompts, encoder.count_tokens(prompts)):
        if count > limit:
            raise _too_long(prompt, count, limit)
    features, _ = encoder.features(prompts, limit)
    return TextCondition(torch.from_numpy(features).float().to(device))


def grid_rows(model, classes: list[int] | None, prompts: list[str] | None, device, encoder=None,
              key: str = "classes"):
    """(one condition per grid row, the rows' labels): prompts for a text model (required),
    class ids for a class model (None: the first classes, at most 32); `key` names the
    class ids' setting in errors."""
    if model.spec.text.kind:
        if not prompts:
            raise ValueError("this generator is text-to-image: give prompt=\"...\" or "
                             "prompts=FILE (one prompt a line); the empty caption (unconditional "
                             "samples) is prompt='\"\"'")
        return prompt_condition(model, prompts, device, encoder), list(prompts)
    if prompts:
        raise ValueError("prompt/prompts given, but this generator is class-conditional: use "
                         "classes=[...]")
    classes = classes or list(range(min(model.spec.num_classes, 32)))
    check_class_ids(model.spec, classes, key)
    labels = ClassCondition(torch.tensor(classes, device=device))
    return labels, [model.spec.class_names[c] for c in classes]


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
