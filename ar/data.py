"""Training data over a cache written by `python -m tokenizer.encode`: discrete codes
(`CodeCache`), every scale's codes of a multi-scale tokenizer (`ScaleCodeCache`) or continuous
latents (`LatentCache`); `open_cache` picks by meta.json's kind.

The cache is a few large memory-mapped arrays (nanoGPT's train.bin idea), not one file per
image. Each image has two variants (the original and its horizontal flip); one is picked per
visit, as MAR does with its flipped latents. A latent cache holds each variant's posterior
(mean and log-variance), and every visit draws a fresh latent from it (MAR's trick: the
generator never sees the same latent twice), scaled by the tokenizer's latent_scale.

The batch stream is a pure function of (seed, samples consumed): epoch e visits the images in
the order of a permutation drawn from (seed, e), with the variant and the condition-dropout
decision drawn alongside, and a latent's noise is keyed by (seed, its position in the stream).
So
  - resuming needs only the number of samples consumed;
  - the global batch is identical for any number of processes, each taking its slice;
  - condition dropout and latent noise do not depend on the world size either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import List

import numpy as np
import torch

from tokenizer.kl_loss import sample, split_moments

_NOISE_TAG = 0x4C41544E  # keeps latent-noise seeds apart from the epoch orders' ([seed, epoch])
# (what the cache holds, what the reader needs) -> what is wrong, and what to do about it
_WRONG_KIND = {
    "continuous": "this cache holds continuous latents; a token head needs discrete codes: encode "
                  "with a VQ tokenizer (or train a flow model on it)",
    ("discrete", "continuous"): "this cache holds discrete codes; a flow model needs continuous "
                                "latents: encode with a KL tokenizer",
    ("discrete", "multiscale"): "this cache holds one code grid per image; a next-scale model "
                                "(model.order.name=scale) needs every scale's codes: encode with a "
                                "multi-scale (msvq) tokenizer",
    "multiscale": "this cache holds per-scale codes (a multi-scale tokenizer's, VAR's VQVAE); "
                  "they train a next-scale model (model.order.name=scale, model.head=token)",
}


def read_sorted(array: np.ndarray, rows: np.ndarray, *more: np.ndarray) -> np.ndarray:
    """array[rows, *more] (fancy indices, a copy), read in ascending row order: sorted reads
    are kinder to a memory map."""
    order = np.argsort(rows)
    out = np.empty((len(rows), *array.shape[1 + len(more):]), dtype=array.dtype)
    out[order] = array[(rows[order], *(m[order] for m in more))]
    return out


@dataclass
class MultiScaleSpec:
    """A multi-scale tokenizer's quantiser (VAR's VQVAE), which next-scale inputs rebuild from
    codes; copied from the tokenizer's config. Empty for single-grid tokenizers."""

    patch_nums: List[int] = field(default_factory=list)  # side of each scale's code map, coarse to fine (last = grid side)
    code_dim: int = 0  # channels of a code vector (VAR's Cvae)
    quant_resi: float = 0.5  # r of the tokenizer's phi(x) = (1 - r) x + r conv3x3(x)
    share_quant_resi: int = 4  # the tokenizer's phi convolutions: 1 shared, 0 one per scale, K spread


class _ShardedCache:
    """Memory-mapped per-image arrays (N, A, ...) and labels (N,) across a cache's shards."""

    kind = ""  # the meta.json kind this reader accepts
    data_key = ""  # the shards' data-file key in meta.json

    def __init__(self, path: str | Path):
        from tokenizer.cache import open_array, read_meta  # named errors for broken files

        self.path = Path(path)
        self.meta = read_meta(self.path)
        found = self.meta["kind"]
        if found != self.kind:
            raise ValueError(f"{self.path}: {_WRONG_KIND.get(found) or _WRONG_KIND[found, self.kind]}")
        self.grid_h, self.grid_w = self.meta["grid"]
        self.num_classes = int(self.meta["num_classes"])
        self.class_names = list(self.meta["class_names"])
        self.num_variants = len(self.meta["variants"])
        self.shards = [open_array(self.path / s[self.data_key]) for s in self.meta["shards"]]
        self.shard_labels = [open_array(self.path / s["labels"], mmap=False) for s in self.meta["shards"]]
        self.starts = np.cumsum([0] + [len(c) for c in self.shards])
        self.labels = np.concatenate(self.shard_labels).astype(np.int64)
        self.count = int(self.starts[-1])
        if self.count != self.meta["count"] or self.count == 0:
            raise ValueError(f"{self.path}: meta.json says {self.meta['count']} images but the "
                             f"shards hold {self.count}; re-run the encode command")

    def spec_fields(self) -> dict:
        """Its part of the GeneratorSpec: what the cache dictates to the model."""
        tok = self.meta["tokenizer"]
        return {"grid_h": self.grid_h, "grid_w": self.grid_w, "num_classes": self.num_classes,
                "class_names": self.class_names, "resolution": int(self.meta["resolution"]),
                "tokenizer_path": tok["path"], "tokenizer_sha256": tok["sha256"]}

    def identity(self) -> dict:
        """Its part of a run's identity: what a resume must find unchanged."""
        meta = self.meta
        return {"tokenizer_sha256": meta["tokenizer"]["sha256"], "grid": list(meta["grid"]),
                **self.size_identity(), "count": meta["count"], "fingerprint": self.fingerprint(),
                "num_classes": meta["num_classes"], "resolution": meta["resolution"],
                "variants": list(meta["variants"])}

    def size_identity(self) -> dict:
        raise NotImplementedError

    def fingerprint(self) -> str:
        """The hash of every shard's data and labels that the encoder recorded in meta.json;
        caches written before it did are hashed now."""
        from tokenizer.cache import array_sha256, cache_fingerprint

        if "fingerprint" in self.meta:
            return self.meta["fingerprint"]
        return cache_fingerprint([{"data": array_sha256(d), "labels": array_sha256(l)}
                                  for d, l in zip(self.shards, self.shard_labels)])

    def _gather(self, indices: np.ndarray, variants: np.ndarray, dtype) -> np.ndarray:
        """Rows (n, ...) of the given image indices and variants, as `dtype`."""
        out = np.empty((len(indices), *self.shards[0].shape[2:]), dtype=dtype)
        shard_of = np.searchsorted(self.starts, indices, side="right") - 1
        for s in np.unique(shard_of):
            rows = np.nonzero(shard_of == s)[0]
            out[rows] = read_sorted(self.shards[s], indices[rows] - self.starts[s], variants[rows])
        return out


class CodeCache(_ShardedCache):
    """Memory-mapped codes (N, A, h*w) and labels (N,) of a discrete cache."""

    kind, data_key = "discrete", "codes"

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.codebook_size = int(self.meta["codebook_size"])
        self.code_shape = (self.grid_h, self.grid_w)  # one image's codes, as the model takes them

    def spec_fields(self) -> dict:
        return {**super().spec_fields(), "vocab_size": self.codebook_size}

    def size_identity(self) -> dict:
        return {"codebook_size": self.meta["codebook_size"]}

    def get(self, indices: np.ndarray, variants: np.ndarray) -> torch.Tensor:
        """Codes (n, *code_shape) int64 for the given image indices and variants."""
        out = self._gather(indices, variants, np.int64)
        return torch.from_numpy(out).view(-1, *self.code_shape)

    def items(self, indices: np.ndarray, variants: np.ndarray, seed: int, offset: int) -> torch.Tensor:
        """What the generator trains on for stream samples [offset, offset + n): the codes."""
        return self.get(indices, variants)


class ScaleCodeCache(CodeCache):
    """Memory-mapped codes (N, A, L) of a multi-scale cache: every scale's code map, coarse to
    fine, each row-major (`scales` their sides; the last is the grid)."""

    kind = "multiscale"

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.scales = [int(p) for p in self.meta["scales"]]
        self.seq_len = sum(p * p for p in self.scales)
        self.code_shape = (self.seq_len,)  # every scale's codes, concatenated
        if self.shards[0].shape[2:] != self.code_shape:
            raise ValueError(f"{self.path}: shards hold codes of shape {self.shards[0].shape[2:]}, "
                             f"but meta.json's scales {self.scales} make {self.seq_len} per image; "
                             f"re-run the encode command")

    def spec_fields(self) -> dict:
        """... and the quantiser's facts, from the tokenizer's config."""
        t = self.meta["tokenizer"]["config"]
        multiscale = MultiScaleSpec(patch_nums=self.scales, code_dim=t["codebook_dim"],
                                    quant_resi=t["quant_resi"], share_quant_resi=t["share_quant_resi"])
        return {**super().spec_fields(), "multiscale": multiscale}


class LatentCache(_ShardedCache):
    """Memory-mapped posterior moments (N, A, 2C, h, w) float16 and labels (N,) of a
    continuous cache; latents the generator sees are (sample - latent_shift) * latent_scale."""

    kind, data_key = "continuous", "moments"

    def __init__(self, path: str | Path):
        super().__init__(path)
        self.channels = int(self.meta["channels"])
        self.latent_scale = float(self.meta["latent_scale"])
        self.latent_shift = float(self.meta.get("latent_shift", 0.0))
        stored = self.shards[0].shape[2:]
        if stored != (2 * self.channels, self.grid_h, self.grid_w):
            raise ValueError(f"{self.path}: shards hold moments of shape {stored}, but meta.json "
                             f"says {self.channels} channels on a {self.grid_h}x{self.grid_w} "
                             f"grid; re-run the encode command")

    def spec_fields(self) -> dict:
        return {**super().spec_fields(), "latent_channels": self.channels}

    def size_identity(self) -> dict:
        return {"channels": self.meta["channels"], "latent_scale": self.meta["latent_scale"]}

    def get(self, indices: np.ndarray, variants: np.ndarray) -> torch.Tensor:
        """Posterior moments (n, 2C, h, w) float32 (mean, then unclamped logvar)."""
        return torch.from_numpy(self._gather(indices, variants, np.float32))

    def items(self, indices: np.ndarray, variants: np.ndarray, seed: int, offset: int) -> torch.Tensor:
        """Scaled posterior samples (n, C, h, w) of stream samples [offset, offset + n).

        Each item's noise comes from its own generator keyed by (seed, stream position): a few
        microseconds per item, and the same latent wherever and in whatever batch it is drawn.
        """
        # logvar clamped to [-30, 20], as LDM/MAR
        mean, logvar = split_moments(self.get(indices, variants))
        noise = np.stack([np.random.default_rng([_NOISE_TAG, seed, offset + i])
                          .standard_normal(mean.shape[1:], dtype=np.float32)
                          for i in range(len(mean))])
        z = sample(mean, logvar, torch.from_numpy(noise))
        return (z - self.latent_shift) * self.latent_scale


CACHES = {"discrete": CodeCache, "multiscale": ScaleCodeCache, "continuous": LatentCache}


def open_cache(path: str | Path) -> CodeCache | ScaleCodeCache | LatentCache:
    """The reader for the cache's kind (meta.json "kind")."""
    from tokenizer.cache import read_meta

    return CACHES[read_meta(path)["kind"]](path)


class BatchStream:
    """Deterministic global batches: `batch(offset, size)` = the `size` samples that follow
    the first `offset` samples of the run, with their conditions drawn by `source` (the model's
    condition entry's training side: class labels, captions, ...)."""

    def __init__(self, cache: CodeCache | LatentCache, seed: int, cond_dropout: float, source):
        self.cache, self.seed, self.cond_dropout = cache, seed, cond_dropout
        self.source = source

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

    def batch(self, offset: int, size: int):
        """Codes (size, h, w) or (size, L) int64, or scaled latents (size, C, h, w) float32
        sampled from the cached posteriors, and their conditions, dropped ones set to the null."""
        indices, variants, drop = self.plan(offset, size)
        if self.source.one_variant:
            variants = np.zeros_like(variants)
        codes = self.cache.items(indices, variants, self.seed, offset)
        return codes, self.source.draw(indices, drop)
