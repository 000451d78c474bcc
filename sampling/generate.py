"""Generation as free functions over a model (gpt-fast's pattern), one registry of samplers.

Every sampler runs over one `SamplingContext` (sampling/context.py: the guided rows and their
null, the KV cache and the prefill, the condition's vectors, step scales, noise keys) and keeps
only its loop:

    plain     one forward pass per step: the head draws the step's tokens   sampling/plain.py
    flow      one integration per step (sde | ode, sampling.flow_sampler)    sampling/flow.py
    sjd       speculative Jacobi decoding: drafts verified by the lossless
              rule of SJD                                                   sampling/speculative.py
    coupled   ... with drafts and draws coupled (lossless, more accepted)   sampling/speculative.py
    gsd       ... grouped acceptance (lossy, faster)                         sampling/speculative.py

An entry says what it needs from the model (a head that draws tokens, inputs that feed a window
of drafts) and refuses a model without it, by name. `sampler=plain` on a model whose inputs
integrate (flow) is the flow sampler: one step of the order at a time, each integrated.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from sampling.context import open_context
from sampling.flow import flow_loop
from sampling.plain import plain_loop
from sampling.settings import SamplingConfig
from sampling.speculative import SpeculativeConfig, SpeculativeStats, speculative_loop


@dataclass(frozen=True)
class Sampler:
    loop: Callable  # (SamplingContext) -> codes, or (codes, SpeculativeStats)
    integrates: bool = False  # for models whose inputs integrate each step (flow), not draw it
    window: bool = False  # verifies a window of drafted steps in one pass
    counts_passes: bool = False  # the loop returns its own cost (speculative samplers)
    note: str = ""  # why a model it does not fit cannot use it


def _cost(model, B: int) -> SpeculativeStats:
    """What plain sampling costs: one pass per step (after the prefill)."""
    passes = plain_passes(model)
    return SpeculativeStats(images=B, steps=B * model.order.num_steps, tokens=B * model.order.num_tokens,
                            passes=B * passes, batch_passes=passes)


def _speculative(rule: str) -> Sampler:
    """A Jacobi-window sampler with its acceptance rule (sampling/verify.py)."""
    return Sampler(partial(speculative_loop, rule=rule), window=True, counts_passes=True,
                   note="speculative decoding drafts and verifies discrete tokens; this flow model "
                        "integrates each step's latents, so use sampler=plain")


SAMPLERS = {"plain": Sampler(plain_loop), "flow": Sampler(flow_loop, integrates=True),
            "sjd": _speculative("sjd"), "coupled": _speculative("coupled"), "gsd": _speculative("gsd")}


def sampler_for(name: str, model) -> Sampler:
    """The registry entry, checked against the model (a named error where it does not fit)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r}; choose one of {tuple(SAMPLERS)}")
    if name == "plain" and model.inputs.integrates:
        name = "flow"  # plain: a step at a time; a flow model's step is integrated
    entry = SAMPLERS[name]
    if entry.integrates != model.inputs.integrates:
        why = entry.note or (f"it {'integrates latents' if entry.integrates else 'draws tokens'}, which "
                             f"this model's {model.inputs.kind} inputs do not feed")
        raise ValueError(f"sampler={name}: {why}")
    if entry.window and not model.inputs.supports_window:
        raise ValueError(f"sampler={name}: a {model.inputs.kind} model feeds each step from "
                         f"the whole previous step (next-scale: the previous scales' sum; "
                         f"shuffle: its tokens fused), so a window of drafts cannot be verified "
                         f"in one pass; use sampler=plain")
    return entry


def plain_passes(model) -> int:
    """Forward passes plain sampling runs per image after the prefill (discrete models): one
    per step, but the first step of inputs whose prefill predicts it comes with the prefill."""
    return model.order.num_steps - (1 if model.inputs.prefill_predicts_first else 0)


@torch.no_grad()
def sample_codes(model, cond, image_ids: torch.Tensor, seed: int, settings: SamplingConfig,
                 sampler: str = "plain", options: SpeculativeConfig | None = None,
                 extend_fn=None, progress: bool = False) -> tuple[torch.Tensor, SpeculativeStats | None]:
    """Codes (or latents) for the conditions with the chosen sampler, and what they cost in
    forward passes (None for models whose steps integrate many passes)."""
    entry = sampler_for(sampler, model)
    ctx = open_context(model, cond, image_ids, seed, settings, extend_fn, options, progress)
    out = entry.loop(ctx)
    if entry.counts_passes:
        return out
    return out, (None if entry.integrates else _cost(model, len(cond)))


def generate(model, cond, image_ids: torch.Tensor, seed: int, settings: SamplingConfig,
             extend_fn: Callable | None = None, progress: bool = False) -> torch.Tensor:
    """Sample code grids (B, h, w) for the conditions `cond` (B), one step at a time (flow
    models: latents (B, C, h, w)); image_ids (B,) key the noise."""
    return sample_codes(model, cond, image_ids, seed, settings, "plain", None, extend_fn, progress)[0]
