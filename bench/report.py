"""What the benchmarks share: how they name the device and how they print their tables."""

from __future__ import annotations

import time
from typing import Callable, Sequence, Union

import torch

Cell = Union[str, Callable[[dict], object]]  # a row key, or a function of the row


def device_label(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' on a GPU, '2 threads' on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} threads"


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, int, Cell, str]]) -> None:
    """Right-aligned columns (header, width, cell, format spec such as '.2f')."""
    print(" ".join(f"{header:>{width}}" for header, width, _, _ in columns))
    for r in rows:
        print(" ".join(f"{(cell(r) if callable(cell) else r[cell]):>{width}{spec}}"
                       for _, width, cell, spec in columns))


def seconds_per_call(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Mean wall time of `run()` over `repeats` calls after one warm-up call (allocations,
    caches, compilation), with the GPU synchronised around the timed calls."""
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats
