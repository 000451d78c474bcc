"""The learning-rate schedule of every trainer (the generator's train_gen.py and the
tokenizers' tokenizer/train.py): one function of the step, so both decay alike."""

from __future__ import annotations

import math


def lr_at(step: int, base_lr: float, warmup: int, total: int, schedule: str,
          min_ratio: float = 0.0, decay_start: float = 0.0) -> float:
    """Linear warm-up over `warmup` steps, then constant, or a cosine or linear decay to
    min_ratio * lr; the decay starts after the warm-up or at fraction `decay_start` of
    `total`, whichever is later. Fractions scale with the run, so a shorter run still decays
    (xAR's schedule was written in epochs of an 800-epoch run, xAR#15). VAR's `lin0` is the
    linear decay, starting 5% into the post-warm-up span, to 1% of lr."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant":
        return base_lr
    if schedule in ("cosine", "linear"):
        start = max(warmup, round(decay_start * total))
        progress = min(1.0, max(0, step - start) / max(1, total - start))
        left = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1 - progress
        return base_lr * (min_ratio + (1 - min_ratio) * left)
    raise ValueError(f"unknown schedule {schedule!r}; choose constant, cosine or linear")
