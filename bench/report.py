"""What the benchmarks share: how they name the device and how they print their tables."""

from __future__ import annotations

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
