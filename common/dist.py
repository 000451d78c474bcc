"""Process-group helpers: a no-op for a plain `python script.py`, DDP-ready under torchrun.

torchrun (and DeepSpeed's launcher) set RANK, LOCAL_RANK and WORLD_SIZE; when they are absent
the script is a single process and nothing is initialised. The backend is NCCL on GPU and gloo
on CPU, so multi-process behaviour is exercised by the CPU test-suite too. Both trainers (the
generator's and the tokenizers') wrap their models with `wrap_ddp`; `rank_seed` is the rule
for each rank's dropout seed.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int  # global rank of this process
    world_size: int  # number of processes
    local_rank: int  # rank on this machine, selects the GPU
    device: torch.device  # where this process computes

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but no CUDA GPU is visible; use device=cpu")
        return torch.device("cuda", local_rank)
    return torch.device(device)


def init_distributed(device: str = "auto") -> DistInfo:
    """Read the launcher's environment and join the process group if there is more than one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_seed(seed: int, rank: int, stride: int, offset: int = 0) -> int:
    """The seed of this rank's unkeyed random draws (dropout), which must differ per rank:
    seed * stride + offset + rank. Each trainer keeps its own stride and offset, since changing
    them would change its draws: the generator's are (world size, 1), the tokenizer trainer's
    (7919, 31 x the step it starts at, so that a resumed run does not replay its masks)."""
    return seed * stride + offset + rank


def wrap_ddp(module: torch.nn.Module, device: torch.device, sync_buffers: bool = True,
             find_unused: bool = False) -> torch.nn.Module:
    """`module` under DistributedDataParallel on this process's device. sync_buffers=False
    keeps each rank's buffers its own (newer torch renamed broadcast_buffers to
    forward_sync_buffers, and warns about the old name); find_unused for a model whose forward
    leaves some parameters without a gradient."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    options = {}
    if not sync_buffers:
        new = "forward_sync_buffers" in inspect.signature(DDP).parameters
        options["forward_sync_buffers" if new else "broadcast_buffers"] = False
    if find_unused:
        options["find_unused_parameters"] = True
    return DDP(module, device_ids=[device.index] if device.type == "cuda" else None, **options)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all processes (a copy; the input is left unchanged)."""
    t = t.detach().clone()
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def cleanup() -> None:
    if is_distributed():
        # every rank reaches the end before the group goes: gloo aborts a process whose peer
        # tears down while it is still in a collective ("terminate called without an active
        # exception", seen once in a two-process test)
        dist.barrier()
        dist.destroy_process_group()


def get_logger(name: str, rank: int = 0) -> logging.Logger:
    """A logger that prints on rank 0 and stays quiet (warnings only) elsewhere."""
    log = logging.getLogger(name)
    if not log.handlers:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("[%(asctime)s %(name)s] %(message)s", "%H:%M:%S"))
        log.addHandler(h)
        log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    return log
