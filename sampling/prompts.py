"""Prompt files: one prompt a line, or a captions.jsonl. The prompts become conditions through
the model's condition entry (`model.cond.grid_rows`, ar/conditioning), which tokenizes or
encodes them exactly as the training captions were."""

from __future__ import annotations

import json
from pathlib import Path


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
