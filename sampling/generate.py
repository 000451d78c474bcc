"""Generation as free functions over a model (gpt-fast's pattern): one loop for every order.

    prefill(condition rows) -> for each step s of the order:
        inputs of step s --extend--> hidden states --head--> the step's tokens (B, G)

The model's static KV cache is its only mutable inference state. Classifier-free guidance
doubles the batch (conditional rows first, null-condition rows second), both halves are fed
the same tokens, and the scale of each step comes from `sampling.guidance`. Noise comes from
`sampling.noise`, keyed by each image's global index and each element's sequence index, so an
image does not depend on the batch it was generated in or on the number of processes.
Positions live on the device: the loop never syncs with the host.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List

import torch
from tqdm import tqdm

from ar.conditioning import ClassCondition
from common.config import ConfigError, check_fields
from sampling import noise
from sampling.flow import FLOW_SAMPLERS, generate_flow
from sampling.guidance import CFG_SCHEDULES, scale_at, uses_cfg


@dataclass
class SamplingConfig:
    cfg_scale: float = 1.0  # classifier-free guidance, uncond + scale * (cond - uncond): on whenever != 1 (1 = off, no doubled batch; 0 = unconditional samples); LlamaGen's rule (> 1): sampling/guidance.py
    cfg_schedule: str = "constant"  # constant | linear | linear_full | power | cosine | half_linear: the scale over the steps (sampling/guidance.py)
    cfg_power: float = 1.0  # cfg_schedule=power: the exponent of the ramp
    cfg_interval: List[float] = field(default_factory=lambda: [0.0, 1.0])  # guide only steps with lo <= step/steps < hi
    temperature: float = 1.0  # softmax temperature; 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # nucleus sampling mass; 1.0 = all
    flow_sampler: str = "sde"  # flow models: sde (Euler-Maruyama, xAR's default) | ode (Euler)
    flow_steps: int = 40  # flow models: network calls per step of the order (xAR-B: 40, L/H: 50)

    def validate(self) -> None:
        check_fields(self, "sampling.", {"cfg_scale": ">= 0", "cfg_schedule": CFG_SCHEDULES,
                                         "cfg_power": "> 0", "temperature": ">= 0",
                                         "top_k": ">= 0", "top_p": "(0, 1]",
                                         "flow_sampler": FLOW_SAMPLERS, "flow_steps": ">= 1"})
        lo_hi = self.cfg_interval
        if len(lo_hi) != 2 or not 0 <= lo_hi[0] < lo_hi[1] <= 1:
            raise ConfigError(f"sampling.cfg_interval={lo_hi} is out of range: it must be "
                              f"[lo, hi] with 0 <= lo < hi <= 1")


def extend(model, x: torch.Tensor, positions: torch.Tensor, ada=None) -> torch.Tensor:
    return model.extend(x, positions, ada)


def compiled_extend() -> Callable:
    """extend compiled for CUDA graphs: static shapes make every step replayable."""
    return torch.compile(extend, mode="reduce-overhead", fullgraph=True)


@torch.no_grad()
def generate(model, cond: ClassCondition, image_ids: torch.Tensor, seed: int,
             settings: SamplingConfig, extend_fn: Callable | None = None,
             progress: bool = False) -> torch.Tensor:
    """Sample code grids (B, h, w) for the conditions `cond` (B); image_ids (B,) key the noise.
    Flow models integrate each step instead (`sampling.flow`) and give latents (B, C, h, w)."""
    if model.head.continuous:
        return generate_flow(model, cond, image_ids, seed, settings, extend_fn, progress)
    order, inputs = model.order, model.inputs
    device = cond.device
    guided = uses_cfg(settings)
    rows = cond.with_null(model.cond.null) if guided else cond
    extend_fn = extend_fn or extend
    keys = noise.image_keys(seed, image_ids.to(device))
    elements = torch.arange(order.num_tokens, device=device)  # noise counters: sequence indices
    # every row's tokens; the unconditional CFG rows are fed the same (guided) tokens
    seq = torch.zeros(len(rows), order.num_tokens, dtype=torch.long, device=device)  # (R, N)
    copies = len(rows) // len(cond)

    model.setup_cache(len(rows))  # kept afterwards; model.clear_cache() frees it
    h, vector = model.prefill(rows)  # (R, P, D)
    ada = model.modulation(rows)  # adaLN models: the class vector of every row; else None
    for s in tqdm(range(order.num_steps), desc="steps", leave=False, disable=not progress):
        fed = inputs.step(model, s, seq, vector, len(rows))
        if fed is not None:
            h = extend_fn(model, *fed, ada)  # (R, T, D)
        lo, hi = order.span(s)
        scale = scale_at(settings, s, order.num_steps) if guided else None
        uniform = noise.uniform_elements(keys, elements[lo:hi], model.head.vocab_size)
        tokens = model.head.draw(inputs.draw_states(h, hi - lo), scale, settings, uniform)  # (B, G)
        seq[:, lo:hi] = tokens.repeat(copies, 1)
    return order.to_grid(seq[:len(cond)])
