"""Autoregressive generation as free functions over a model (gpt-fast's pattern).

    prefill(condition rows) -> for each token: head.sample -> decode_step(token)

The model's static KV cache is its only mutable inference state. Classifier-free guidance
doubles the batch (conditional rows first, null-class rows second) and both halves are fed
the same sampled token. Noise comes from `sampling.noise`, keyed by each image's global
index, so an image does not depend on the batch it was generated in or on the number of
processes. Positions and step counters live on the device: the loop never syncs with the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from tqdm import tqdm

from common.config import check_fields
from sampling import noise
from sampling.logits import CFG_SCHEDULES, cfg_scale_at


@dataclass
class SamplingConfig:
    cfg_scale: float = 1.0  # classifier-free guidance scale; 1.0 = off (no doubled batch)
    cfg_schedule: str = "constant"  # constant | linear (1 -> cfg_scale over the tokens)
    temperature: float = 1.0  # softmax temperature; 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    top_p: float = 1.0  # nucleus sampling mass; 1.0 = all

    def validate(self) -> None:
        check_fields(self, "sampling.", {"cfg_scale": ">= 0", "cfg_schedule": tuple(CFG_SCHEDULES),
                                         "temperature": ">= 0", "top_k": ">= 0", "top_p": "(0, 1]"})


def prefill(model, rows: torch.Tensor) -> torch.Tensor:
    return model.prefill(rows)


def decode_step(model, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return model.decode_step(tokens, pos)


def compiled_decode_step() -> Callable:
    """decode_step compiled for CUDA graphs: static shapes make every step replayable."""
    return torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)


@torch.no_grad()
def generate(model, labels: torch.Tensor, image_ids: torch.Tensor, seed: int,
             settings: SamplingConfig, step_fn: Callable | None = None,
             progress: bool = False) -> torch.Tensor:
    """Sample code grids (B, h, w) for class `labels` (B,); image_ids (B,) key the noise."""
    device = labels.device
    guided = settings.cfg_scale != 1.0
    rows = torch.cat([labels, torch.full_like(labels, model.cond.null_id)]) if guided else labels
    step_fn = step_fn or decode_step
    n = model.num_tokens
    keys = noise.image_keys(seed, image_ids.to(device))
    step_ids = torch.arange(n, device=device)
    positions = torch.arange(model.prefix, model.prefix + n, device=device)
    seq = torch.empty(labels.shape[0], n, dtype=torch.long, device=device)

    model.setup_cache(rows.shape[0])  # kept afterwards; model.clear_cache() frees it
    h = prefill(model, rows)  # (R, D)
    for t in tqdm(range(n), desc="tokens", leave=False, disable=not progress):
        scale = cfg_scale_at(settings.cfg_scale, settings.cfg_schedule, t, n) if guided else None
        step = step_ids[t]
        tokens = model.head.sample(h, scale, settings,
                                   lambda size, step=step: noise.uniform(keys, step, size))
        seq[:, t] = tokens
        if t + 1 < n:
            feed = torch.cat([tokens, tokens]) if guided else tokens
            h = step_fn(model, feed, positions[t:t + 1])
    return model.order.to_grid(seq)
