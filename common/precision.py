"""The one precision rule of every script: what `precision=auto|bf16|fp32` means on a device.

"auto" takes bf16 where the hardware computes it natively: GPUs, and CPUs with AVX512-BF16 or
AMX (there bf16 matmuls run ~2.6x faster than fp32); fp32 elsewhere. Training uses it as
autocast (weights stay fp32); sampling casts the frozen generator's weights.
"""

from __future__ import annotations

import contextlib

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_bf16() -> bool:
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)()
               for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def use_bf16(precision: str, device: torch.device | str) -> bool:
    """Whether `precision` means bf16 on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision == "bf16"
    device = torch.device(device)
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())


def resolved(precision: str, device: torch.device | str) -> str:
    """"bf16" or "fp32": what `precision` resolves to on `device` (for provenance records)."""
    return "bf16" if use_bf16(precision, device) else "fp32"


@contextlib.contextmanager
def autocast(precision: str, device: torch.device):
    """A forward pass's numerics for `precision`: bf16 autocast or nothing."""
    if not use_bf16(precision, device):
        yield
        return
    with torch.autocast(device.type, dtype=torch.bfloat16):
        if device.type == "cpu":
            # the CPU flash-attention kernel's bf16 backward is slower than plain matmuls
            with sdpa_kernel(SDPBackend.MATH):
                yield
        else:
            yield
