"""Training data over a code cache (written by `python -m tokenizer.encode`).

The cache is a few large memory-mapped arrays (nanoGPT's train.bin idea), not one file per
image. Each image has two variants (the original and its horizontal flip); one is picked per
visit, as MAR does with its flipped latents.

The batch stream is a pure function of (seed, samples consumed): epoch e visits the images in
the order of a permutation drawn from (seed, e), with the variant and the condition-dropout
decision drawn alongside. So
  - resuming needs only the number of samples consumed;
  - the global batch is identical for any number of processes, each taking its slice;
  - condition dropout does not depend on the world size either.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ar.conditioning import ClassCondition


class CodeCache:
    """Memory-mapped codes (N, A, h*w) and labels (N,) across the cache's shards."""

    def __init__(self, path: str | Path):
        from tokenizer.cache import read_meta  # validates meta.json with clear errors

        self.path = Path(path)
        self.meta = read_meta(self.path)
        if self.meta["kind"] != "discrete":
            raise ValueError(f"{self.path}: holds {self.meta['kind']} latents; the token head "
                             f"needs discrete codes")
        self.grid_h, self.grid_w = self.meta["grid"]
        self.codebook_size = int(self.meta["codebook_size"])
        self.num_classes = int(self.meta["num_classes"])
        self.class_names = list(self.meta["class_names"])
        self.num_variants = len(self.meta["variants"])
        codes, labels = [], []
        for shard in self.meta["shards"]:
            codes.append(np.load(self.path / shard["codes"], mmap_mode="r"))
            labels.append(np.load(self.path / shard["labels"]))
        self.shard_codes = codes
        self.starts = np.cumsum([0] + [len(c) for c in codes])
        self.labels = np.concatenate(labels).astype(np.int64)
        self.count = int(self.starts[-1])
        if self.count != self.meta["count"] or self.count == 0:
            raise ValueError(f"{self.path}: meta.json says {self.meta['count']} images but the "
                             f"shards hold {self.count}; re-run the encode command")

    def get(self, indices: np.ndarray, variants: np.ndarray) -> torch.Tensor:
        """Codes (n, h, w) int64 for the given image indices and variants."""
        out = np.empty((len(indices), self.grid_h * self.grid_w), dtype=np.int64)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            local = indices[rows] - self.starts[s]
            order = np.argsort(local)  # sorted reads are kinder to a memory map
            out[rows[order]] = self.shard_codes[s][local[order], variants[rows[order]]]
        return torch.from_numpy(out).view(-1, self.grid_h, self.grid_w)


class BatchStream:
    """Deterministic global batches: `batch(offset, size)` = the `size` samples that follow
    the first `offset` samples of the run."""

    def __init__(self, cache: CodeCache, seed: int, cond_dropout: float):
        self.cache, self.seed, self.cond_dropout = cache, seed, cond_dropout

    @lru_cache(maxsize=2)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        n = self.cache.count
        perm = rng.permutation(n)
        variants = rng.integers(0, self.cache.num_variants, n)
        drop = rng.random(n) < self.cond_dropout
        return perm, variants, drop

    def plan(self, offset: int, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indices, variants, drop) of samples [offset, offset + size), across epochs."""
        n = self.cache.count
        parts = []
        while size > 0:
            epoch, start = divmod(offset, n)
            take = min(size, n - start)
            perm, variants, drop = self._epoch(epoch)
            parts.append((perm[start:start + take], variants[start:start + take],
                          drop[start:start + take]))
            offset, size = offset + take, size - take
        return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]

    def batch(self, offset: int, size: int) -> tuple[torch.Tensor, ClassCondition]:
        """Codes (size, h, w) and their conditions, dropped ones set to the null class."""
        indices, variants, drop = self.plan(offset, size)
        codes = self.cache.get(indices, variants)
        labels = self.cache.labels[indices].copy()
        labels[drop] = self.cache.num_classes  # the null class
        return codes, ClassCondition(torch.from_numpy(labels))
