"""Flow-matching sampling (xAR): every step of the order is a group of latents integrated from
noise (t = 1) to data (t = 0) by the model's velocity field, conditioned on the clean groups of
the earlier steps through the KV cache.

    for each step s of the order:
        x ~ N(0, I) (B, G, C); for k in 0..N-1: v = model(x, t_k) -> x <- x + ... (ODE | SDE)
        the finished group is fed again, clean (t = 0), with the first call of step s + 1: its
        keys/values then stay in the cache; the noisy group's entries are overwritten

Integrators (xAR `models/sampler.py` and `models/xar.py`; facts checked against the fixture):
    sde  Euler-Maruyama (xAR's default): t_k = linspace(1, 0.04, N), then 0. With the score
         s = (-(1 - t) v - x) / t and diffusion 2t, the drift is d = v - t s, guided by CFG;
         x <- x + d (t_{k+1} - t_k) + sqrt(2 t_k) sqrt(|t_{k+1} - t_k|) eps_k, and the last
         step (to 0) adds no noise. N network calls.
    ode  Euler: t_k = linspace(1, 0, N + 1), x <- x + (t_{k+1} - t_k) v_guided. N calls.
The state is float64 (as xAR keeps it), the network gets float32 inputs. CFG doubles the rows
(conditional first) at every call, including unguided steps, so the null rows' clean context is
in the cache when a later step guides; at scale 1 the conditional result is used as it is (xAR).
The scale of step s comes from `sampling.guidance` (xAR: `linear_full`, constant inside a step).

Noise is keyed by image id, step and draw (`sampling.noise.normal_elements`), so an image does
not depend on its batch or the number of processes; `noise_source(s, draw, shape)` replaces it
(the parity tests feed the draws recorded from xAR's code).
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm import tqdm

from ar.logits import guide
from sampling import noise
from sampling.context import SamplingContext, open_context
from sampling.settings import FLOW_SAMPLERS

SDE_T_MIN = 0.04  # xAR's last SDE time before the final deterministic step


def time_grid(sampler: str, steps: int) -> list[float]:
    """The N + 1 times of a sampler, from 1 (noise) to 0 (data), in float64."""
    if sampler == "sde":
        head = torch.linspace(1.0, SDE_T_MIN, steps, dtype=torch.float64) if steps > 1 else \
            torch.ones(1, dtype=torch.float64)
        return head.tolist() + [0.0]
    if sampler == "ode":
        return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64).tolist()
    raise ValueError(f"sampling.flow_sampler={sampler!r}; choose one of {FLOW_SAMPLERS}")


def keyed_noise(ctx: SamplingContext) -> Callable:
    """The default noise source: N(0, I) keyed by (seed, image id, element, draw)."""
    keys, order = ctx.keys(noise.STREAM_FLOW), ctx.model.order
    elements = torch.arange(order.num_tokens, device=ctx.device)

    def draw(step: int, k: int, shape) -> torch.Tensor:
        lo, hi = order.span(step)
        return noise.normal_elements(keys, elements[lo:hi], shape[-1], k)

    return draw


class _Velocity:
    """Calls the model on one step's latents at flow time t; the first call of a step also
    feeds the previous step's clean latents (t = 0) so that they enter the KV cache."""

    def __init__(self, ctx: SamplingContext):
        self.ctx = ctx
        self.context = None  # (clean latents (R, G', C), their positions (G',)) or None

    def __call__(self, x: torch.Tensor, t: float, positions: torch.Tensor) -> torch.Tensor:
        ctx, model = self.ctx, self.ctx.model
        latents = x.float()
        if latents.shape[0] != len(ctx.rows):  # CFG: both halves of the rows see the same latents
            latents = torch.cat([latents, latents])
        groups = [(latents, positions, t)]
        if self.context is not None:
            groups.insert(0, (*self.context, 0.0))
            self.context = None
        fed, fed_positions, ada = model.timed_inputs(groups, ctx.vector, ctx.rows)
        h = ctx.extend_fn(model, fed, fed_positions, ada)
        return model.head.velocity(h[:, h.shape[1] - latents.shape[1]:])  # (R, G, C) float32


def _guided(values: torch.Tensor, scale) -> torch.Tensor:
    """CFG over rows (conditional first); an unguided step (scale 1) keeps the conditional
    rows as they are, as xAR does."""
    if scale == 1.0:
        return values.chunk(2)[0]
    return guide(values, scale)


def integrate(velocity: Callable, x: torch.Tensor, sampler: str, steps: int, scale,
              step_noise: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Integrate one group from x (B, G, C) at t = 1 to t = 0; `velocity(x, t)` gives the raw
    (R, G, C) network output, `step_noise(k)` the SDE noise of step k."""
    grid = time_grid(sampler, steps)
    for k in range(steps):
        t, t_next = grid[k], grid[k + 1]
        eps = step_noise(k) if sampler == "sde" and k < steps - 1 else None  # drawn before the call
        v = velocity(x, t).to(torch.float64)
        if sampler == "ode":
            x = x + (t_next - t) * _guided(v, scale)
            continue
        xr = torch.cat([x, x]) if v.shape[0] != x.shape[0] else x
        score = (-(1 - t) * v - xr) / t
        drift = _guided(v - t * score, scale)  # diffusion 2t: v - (2t / 2) * score
        x = x + drift * (t_next - t)
        if eps is not None:
            x = x + (2 * t) ** 0.5 * abs(t_next - t) ** 0.5 * eps.to(torch.float64)
    return x


@torch.no_grad()
def flow_loop(ctx: SamplingContext, noise_source: Callable | None = None) -> torch.Tensor:
    """Latent grids (B, C, h, w) (scaled latents, as the model was trained on) for the
    context's conditions."""
    model, settings = ctx.model, ctx.settings
    order, B, channels = model.order, len(ctx.cond), model.head.channels
    draw = noise_source or keyed_noise(ctx)
    velocity = _Velocity(ctx)
    seq = torch.empty(B, order.num_tokens, channels, device=ctx.device)
    for s in tqdm(range(order.num_steps), desc="steps", leave=False, disable=not ctx.progress):
        lo, hi = order.span(s)
        positions = model.inputs.out_positions[lo:hi]
        shape = (B, hi - lo, channels)
        x = draw(s, 0, shape).to(ctx.device, torch.float64)
        x = integrate(lambda x, t: velocity(x, t, positions), x, settings.flow_sampler,
                      settings.flow_steps, ctx.scale(s), lambda k: draw(s, k + 1, shape))
        seq[:, lo:hi] = x.float()
        clean = seq[:, lo:hi]
        velocity.context = (torch.cat([clean] * ctx.copies), positions)
    return order.to_grid(seq)


def generate_flow(model, cond, image_ids: torch.Tensor, seed: int, settings,
                  extend_fn: Callable | None = None, progress: bool = False,
                  noise_source: Callable | None = None) -> torch.Tensor:
    """flow_loop over a fresh context (the parity tests' entry, with xAR's recorded noise)."""
    ctx = open_context(model, cond, image_ids, seed, settings, extend_fn, progress=progress)
    return flow_loop(ctx, noise_source)
