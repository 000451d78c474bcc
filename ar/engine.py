"""Training engines: one optimiser step over the global batch, through a single process, DDP
or DeepSpeed ZeRO, with gradient accumulation and the one precision rule.

`t` is the training section of a run's config (`train_gen.TrainConfig`): global_batch,
micro_batch, lr, betas, weight_decay, grad_clip, engine, zero_stage, precision, compile.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ar.data import BatchStream
from ar.optim import deepspeed_config, make_adamw
from common import dist, precision
from common.config import ConfigError


def batch_layout(t, world: int) -> tuple[int, int]:
    """(micro batch per process, accumulation steps) for the configured global batch."""
    g = t.global_batch
    micro = t.micro_batch or g // world
    if micro <= 0 or g % (world * micro):
        raise ConfigError(f"train.global_batch={g} must be a multiple of processes ({world}) x "
                          f"train.micro_batch ({micro})")
    return micro, g // (world * micro)


def autocast(t, device: torch.device):
    if t.engine == "deepspeed":  # DeepSpeed runs the model in bf16 itself
        return contextlib.nullcontext()
    return precision.autocast(t.precision, device)


@dataclass
class Engine:
    forward: Callable  # what the batch goes through: the model, DDP, DeepSpeed or compiled
    optimizer: torch.optim.Optimizer
    ddp: Any = None  # the DDP wrapper, for no_sync during accumulation
    deepspeed: Any = None  # the DeepSpeed engine, which owns backward/step/clipping


def build_engine(t, model: nn.Module, info: dist.DistInfo, micro: int, accum: int) -> Engine:
    optimizer = make_adamw(model, t.lr, (t.beta1, t.beta2), t.weight_decay, info.device)
    eng = Engine(forward=model, optimizer=optimizer)
    if t.engine == "deepspeed":
        import deepspeed  # imported lazily: a heavy import that only this path needs

        bf16 = precision.use_bf16(t.precision, info.device)
        ds_cfg = deepspeed_config(t.global_batch, micro, accum, t.grad_clip, t.zero_stage, bf16)
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if info.device.type == "cuda" else "gloo")
        eng.deepspeed, eng.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                   config=ds_cfg)
        eng.forward = eng.deepspeed
    elif info.world_size > 1:
        eng.ddp = eng.forward = dist.wrap_ddp(model, info.device)
    if t.compile:
        eng.forward = torch.compile(eng.forward)
    return eng


def train_step(t, eng: Engine, model: nn.Module, stream: BatchStream, samples: int,
               info: dist.DistInfo, micro: int, accum: int) -> tuple[dict, torch.Tensor]:
    """One optimiser step over the global batch; returns (the head's metrics on this rank,
    loss included, averaged over the micro-batches; grad norm)."""
    stats: dict[str, torch.Tensor] = {}
    for m in range(accum):
        offset = samples + (m * info.world_size + info.rank) * micro  # this rank's slice
        codes, cond = stream.batch(offset, micro)
        # gradients are all-reduced on the last micro-step only
        sync = eng.ddp.no_sync() if eng.ddp is not None and m < accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast(t, info.device):
                out = eng.forward(codes.to(info.device, non_blocking=True), cond.to(info.device))
            if eng.deepspeed is not None:
                eng.deepspeed.backward(out["loss"])  # DeepSpeed divides by the accumulation steps
                eng.deepspeed.step()
            else:
                (out["loss"] / accum).backward()
        for name, value in out.items():
            stats[name] = stats.get(name, 0.0) + value.detach().float() / accum
    if eng.deepspeed is not None:
        return stats, torch.tensor(float(eng.deepspeed.get_global_grad_norm() or 0.0))
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    eng.optimizer.step()
    eng.optimizer.zero_grad(set_to_none=True)
    return stats, norm
