"""Classifier-free guidance over the steps of any order: the scale at each step.

`scale_at(settings, step, num_steps)` is what the sampling loop asks. With s = step / num_steps
the fraction of steps done before this one (0 at the first step):

    constant  scale at every step (LlamaGen)
    linear    1 + (scale - 1) * s: MAR's form over tokens
    linear_full  1 + (scale - 1) * step / (num_steps - 1): full scale at the last step (xAR's
              form over cells: 1, 1.67, 2.33, 3 for 4 cells at scale 3); one step: the scale
    power     1 + (scale - 1) * s ** cfg_power (MUSE/MAR-style ramps; power 1 is linear)
    cosine    1 + (scale - 1) * (1 - cos(pi * s)) / 2
    half_linear  1 + (scale - 1) * min(1, 2 s): the linear ramp over the first half of the
              steps, the full scale after (one reading of Token-Shuffle's text-to-image
              scheduler, whose exact form is not public; every result records the one used)

and `cfg_interval` [lo, hi] limits guidance to the steps with lo <= s < hi, the scale being 1
(no guidance) elsewhere: guidance in a limited interval (Kynkaanniemi et al., 2024) applied to
AR steps. The full interval [0, 1] guides every step.

When guidance is on (`uses_cfg`): whenever cfg_scale != 1. The batch is then doubled with the
null condition and each step's logits (flow: velocities) are uncond + scale * (cond - uncond),
so a scale below 1 moves toward the unconditional prediction and 0 samples the null condition
alone (the unconditional model). MAR guides by the same rule, and xAR and VAR double their
batch at every step, which at scale 1 is the same as not guiding; LlamaGen's sample_c2i /
generate guide only when cfg_scale > 1 and sample a scale below 1 unguided, which
`reproduce.py` follows for LlamaGen checkpoints.
"""

from __future__ import annotations

import math

import torch

CFG_SCHEDULES = ("constant", "linear", "linear_full", "power", "cosine", "half_linear")


def uses_cfg(settings) -> bool:
    """Whether a `SamplingConfig` guides: its scale is not 1 (see the module docstring)."""
    return settings.cfg_scale != 1.0


def schedule_value(schedule: str, frac: float, power: float = 1.0) -> float:
    """The schedule's weight in [0, 1] at fraction `frac` of the steps."""
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return frac
    if schedule == "power":
        return frac ** power
    if schedule == "cosine":
        return (1.0 - math.cos(math.pi * frac)) / 2.0
    if schedule == "half_linear":
        return min(1.0, 2.0 * frac)
    raise ValueError(f"unknown cfg schedule {schedule!r}; choose one of {CFG_SCHEDULES}")


def cfg_scale_at(scale: float, schedule: str, step: int, total: int, power: float = 1.0,
                 interval: tuple[float, float] = (0.0, 1.0)) -> float:
    """Guidance scale for step `step` of `total` (0-based)."""
    frac = step / total  # < 1 at every step, so hi = 1 takes in the last step
    lo, hi = interval
    if not lo <= frac < hi:
        return 1.0
    if schedule == "linear_full":
        return 1.0 + (scale - 1.0) * (step / (total - 1) if total > 1 else 1.0)
    return 1.0 + (scale - 1.0) * schedule_value(schedule, frac, power)


def step_scales(settings, total: int, device=None):
    """The scale of every step (total,) as a tensor, for loops that index steps per row."""
    return torch.tensor([scale_at(settings, s, total) for s in range(total)], device=device)


def scale_at(settings, step: int, total: int) -> float:
    """The scale for a `SamplingConfig`'s guidance settings at step `step` of `total`."""
    return cfg_scale_at(settings.cfg_scale, settings.cfg_schedule, step, total,
                        settings.cfg_power, tuple(settings.cfg_interval))
