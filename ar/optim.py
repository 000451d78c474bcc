"""Optimiser pieces: AdamW parameter groups and the DeepSpeed config built from ours (so there
is no second, hand-written JSON to keep in sync). The learning-rate schedule, shared with the
tokenizers' trainer, is common/schedule.py."""

from __future__ import annotations

import inspect

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices and embedding tables (dim >= 2); none on norms and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(model: nn.Module, lr: float, betas: tuple[float, float], weight_decay: float,
               device: torch.device) -> torch.optim.AdamW:
    # the fused CUDA kernel is markedly faster; it does not exist for every CPU build
    fused = device.type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas,
                             **({"fused": True} if fused else {}))


def deepspeed_config(global_batch: int, micro_batch: int, accum: int, grad_clip: float,
                     zero_stage: int, bf16: bool) -> dict:
    """The DeepSpeed JSON equivalent of our training settings. The optimiser is ours (passed
    to deepspeed.initialize), and the learning rate is set by us every step."""
    return {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": grad_clip if grad_clip > 0 else 0.0,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,  # we log ourselves
        "wall_clock_breakdown": False,
    }
