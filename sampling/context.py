"""What every sampler sets up before its first step, computed once: the rows (the conditions,
then as many null ones when guidance is on), the KV cache, the condition prefix written into it,
the condition's vector on every input, the adaLN input, each step's guidance scale and the
noise keys. A sampler's loop (sampling/plain.py, flow.py, speculative.py) keeps only its step.

Positions live on the device: the loops never sync with the host except where they say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from sampling import noise
from sampling.guidance import scale_at, step_scales, uses_cfg
from sampling.settings import SamplingConfig


def extend(model, x: torch.Tensor, positions: torch.Tensor, ada=None) -> torch.Tensor:
    return model.extend(x, positions, ada)


def compiled_extend() -> Callable:
    """extend compiled for CUDA graphs: static shapes make every step replayable."""
    return torch.compile(extend, mode="reduce-overhead", fullgraph=True)


@dataclass
class SamplingContext:
    model: Any  # ar.model.ARModel
    cond: Any  # the conditions (B rows)
    rows: Any  # the rows fed: cond, then B null rows when guided (R = 2B), else cond (R = B)
    image_ids: torch.Tensor  # (B,) on the device: key every image's noise
    seed: int
    settings: SamplingConfig
    extend_fn: Callable  # model.extend, or its compiled form
    options: Any = None  # the sampler's own settings (e.g. SpeculativeConfig)
    progress: bool = False  # a progress bar over the steps
    prefix: torch.Tensor | None = None  # (R, P, D) the condition prefix's embeddings
    h: torch.Tensor | None = None  # (R, P, D) the prefill's hidden states
    vector: torch.Tensor | None = None  # (R, 1, D) the condition's vector on every input, or None
    ada: Any = None  # the adaLN input of every row (adaLN models), or None

    @property
    def guided(self) -> bool:
        return len(self.rows) != len(self.cond)

    @property
    def copies(self) -> int:
        """How many times a row's tokens are fed: 2 with guidance (conditional and null rows)."""
        return len(self.rows) // len(self.cond)

    @property
    def device(self) -> torch.device:
        return self.cond.device

    def scale(self, step: int) -> float | None:
        """Step `step`'s guidance scale, None without guidance."""
        return scale_at(self.settings, step, self.model.order.num_steps) if self.guided else None

    def scales(self) -> torch.Tensor | None:
        """Every step's scale (S,) on the device, for loops that index steps per row."""
        return step_scales(self.settings, self.model.order.num_steps, self.device) if self.guided else None

    def keys(self, stream: int = noise.STREAM_TOKENS) -> torch.Tensor:
        """(B,) noise keys of the images for one stream of draws."""
        return noise.image_keys(self.seed, self.image_ids, stream)


def open_context(model, cond, image_ids: torch.Tensor, seed: int, settings: SamplingConfig,
                 extend_fn: Callable | None = None, options=None, progress: bool = False) -> SamplingContext:
    """Set up the cache (kept afterwards; model.clear_cache() frees it) and prefill the rows."""
    rows = cond.with_null(model.cond.null) if uses_cfg(settings) else cond
    ctx = SamplingContext(model, cond, rows, image_ids.to(cond.device), seed, settings,
                          extend_fn or extend, options, progress)
    model.setup_cache(len(rows))
    ctx.prefix, ctx.vector = model.condition(rows)  # (R, P, D)
    ctx.h = model.write_prefix(ctx.prefix, rows)
    ctx.ada = model.modulation(rows)  # adaLN models: the class vector of every row; else None
    return ctx
