"""Counter-based random numbers: the noise for image i, step t, entry v is a pure function of
(seed, i, t, v).

Why not torch.Generator: a generator's stream depends on how work is split into batches and
processes, so the same seed gives different images on 1 and 8 GPUs (and FID moves by ~0.05).
Hashing (seed, image index, step, entry) makes every image independent of the number of
processes, of the batch size and of batch composition, costs a few integer ops per entry,
runs on any device without host synchronisation, and needs no generator state to save.

The hash is Chris Wellons' "lowbias32" integer finaliser (public domain constants), written
with int64 tensor arithmetic that never overflows: 32-bit products are formed from 16-bit
halves of the constant.
"""

from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9

# streams keep independent uses of one seed apart
STREAM_TOKENS = 1
STREAM_LABELS = 2
STREAM_FLOW = 3
STREAM_SPECULATIVE = 4  # speculative decoding's tests and draws, per pass
STREAM_DRAFTS = 5  # speculative decoding's random initial drafts


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) held in int64, without int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK


def hash32(x: torch.Tensor) -> torch.Tensor:
    x = x & _MASK
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def mix(key: torch.Tensor, counter: torch.Tensor | int) -> torch.Tensor:
    """Keys for a sub-stream numbered `counter` (an int, or a tensor broadcasting with key)."""
    if not torch.is_tensor(counter):
        counter = torch.tensor(counter, dtype=torch.int64, device=key.device)
    return hash32(key ^ hash32((counter.to(torch.int64) + _GOLDEN) & _MASK))


def image_keys(seed: int, image_ids: torch.Tensor, stream: int = STREAM_TOKENS) -> torch.Tensor:
    """A 32-bit key per image (B,) from the run seed and each image's global index."""
    seed_t = torch.tensor(seed & _MASK, dtype=torch.int64, device=image_ids.device)
    base = mix(mix(hash32(seed_t), (seed >> 32) & _MASK), stream)
    return mix(base.expand(image_ids.shape), image_ids.to(torch.int64))


def uniform(keys: torch.Tensor, step: torch.Tensor | int, size: int) -> torch.Tensor:
    """Uniform (0, 1) float32 noise (B, size) for one counter value; `keys` from `image_keys`."""
    step_keys = mix(keys, step)  # (B,)
    entries = torch.arange(size, dtype=torch.int64, device=keys.device)
    return _unit(hash32(step_keys[:, None] ^ hash32(entries * _GOLDEN + 1)))  # (B, size)


def uniform_elements(keys: torch.Tensor, elements: torch.Tensor, size: int) -> torch.Tensor:
    """Noise (B, G, size) for the sequence elements (G,) drawn in one step, or (B, G) when
    each row has its own: keyed by each element's sequence index, so a one-token step gets
    exactly `uniform(keys, index, size)` and an element's noise does not depend on how the
    order groups it."""
    element_keys = mix(keys[:, None], elements if elements.dim() == 2 else elements[None, :])  # (B, G)
    entries = torch.arange(size, dtype=torch.int64, device=keys.device)
    return _unit(hash32(element_keys[..., None] ^ hash32(entries * _GOLDEN + 1)))  # (B, G, size)


def _unit(bits: torch.Tensor) -> torch.Tensor:
    # 24 random bits fill a float32 mantissa exactly; the +0.5 keeps 0 and 1 out
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def randint(seed: int, image_ids: torch.Tensor, high: int, stream: int = STREAM_LABELS) -> torch.Tensor:
    """An integer in [0, high) per image, e.g. a random class label (bias < high / 2^32)."""
    return hash32(image_keys(seed, image_ids, stream)) % high


def normal_elements(keys: torch.Tensor, elements: torch.Tensor, size: int,
                    draw: torch.Tensor | int) -> torch.Tensor:
    """Standard normal float32 noise (B, G, size) for the sequence elements (G,), keyed by
    each element's sequence index and a draw number (a flow step's start noise is draw 0,
    its SDE step k's noise draw k + 1): Box-Muller over two uniforms per entry."""
    u = uniform_elements(mix(keys, draw), elements, 2 * size)  # (B, G, 2 size)
    radius = torch.sqrt(-2.0 * torch.log(u[..., :size]))
    return radius * torch.cos((2.0 * torch.pi) * u[..., size:])
