"""The data order of tokenizer training: each global batch is a pure function of (seed, step),
epochs of seeded permutations, so a resumed run sees exactly the batches it would have, and
each rank takes its slice of the same global batch whatever the number of processes."""

from __future__ import annotations

import functools

import torch
from torch.utils.data import DataLoader, Sampler


def global_batch(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Dataset indices of the global batch at `step`: epochs of seeded permutations.

    A pure function of (seed, step), so a resumed run sees exactly the batches it would have.
    """
    pos = torch.arange(step * batch, (step + 1) * batch)
    epochs, offsets = pos // n, pos % n
    out = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        out[sel] = _epoch_perm(n, seed, e)[offsets[sel]]
    return out


@functools.lru_cache(maxsize=2)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    # cached: a batch needs at most two epochs' orders, and re-drawing 1.3M items per step is slow
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class StepBatches(Sampler):
    """This rank's share of each global batch, for steps [start, stop)."""

    def __init__(self, n, batch, seed, start, stop, rank, world):
        self.args = (n, batch, seed)
        self.start, self.stop, self.rank, self.per_rank = start, stop, rank, batch // world

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            idx = global_batch(*self.args, step)
            yield idx[self.rank * self.per_rank:(self.rank + 1) * self.per_rank].tolist()


def load_all(dataset, num_workers: int) -> torch.Tensor:
    """Every image of a (small) dataset as one (N, 3, R, R) tensor."""
    loader = DataLoader(dataset, batch_size=256, num_workers=num_workers)
    return torch.cat([x for x, _ in loader])


def batches(cfg, dataset, images, start, info):
    sampler = StepBatches(len(dataset), cfg.train.batch_size, cfg.train.seed, start,
                          cfg.train.steps, info.rank, info.world_size)
    if images is not None:
        return (images[i] for i in sampler)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.train.num_workers,
                        pin_memory=info.device.type == "cuda", persistent_workers=False)
    return (x for x, _ in loader)
