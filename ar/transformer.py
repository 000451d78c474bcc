"""The LLaMA-style backbone: RMSNorm, 2D rotary attention with an optional static KV cache,
SwiGLU feed-forward. It maps embeddings to hidden states and knows nothing of tokens, heads,
conditions or generation orders.

Adapted from: LlamaGen `autoregressive/models/gpt.py` and gpt-fast `model.py` (block layout,
fused `wqkv`, static cache written by index). Written anew; the cache is an explicit object
and attention over it uses a length mask built from positions, not hidden model state.

Shape letters: B batch, T sequence, D width, H query heads, K key/value heads, Dh head width,
L cache capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass(frozen=True)
class TransformerArgs:
    dim: int
    n_layer: int
    n_head: int
    n_kv_head: int
    ffn_hidden: int
    norm_eps: float = 1e-5
    resid_dropout: float = 0.0
    ffn_dropout: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


##################################################################################
#                                   Helpers                                      #
##################################################################################

def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved (even, odd) channel pairs of x by the angles tabulated in `rope`.

    x: (B, T, H, Dh); rope: (T, Dh/2, 2) holding (cos, sin), or (B, T, Dh/2, 2). A zero row
    (LlamaGen's table at condition positions) zeroes q/k there. Done in float32, as rotations
    of large angles in bf16 lose the position information.
    """
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, Dh/2, 2)
    if rope.dim() == 3:
        rope = rope.unsqueeze(0)
    cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)  # (B|1, T, 1, Dh/2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 so bf16 activations keep their scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class KVCache(nn.Module):
    """Pre-allocated keys/values written by position, so every decode step has static shapes.

    Buffers are non-persistent: they never enter a state dict or a weights file.
    """

    def __init__(self, batch: int, n_kv_head: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        shape = (batch, n_kv_head, capacity, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, K, T, Dh) at positions `pos` (T,); return the whole cache."""
        self.k.index_copy_(2, pos, k.to(self.k.dtype))
        self.v.index_copy_(2, pos, v.to(self.v.dtype))
        return self.k, self.v


##################################################################################
#                                   Blocks                                       #
##################################################################################

class Attention(nn.Module):
    def __init__(self, a: TransformerArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = a.n_head, a.n_kv_head, a.head_dim
        # fused projection: H query heads then K key heads then K value heads
        self.wqkv = nn.Linear(a.dim, (a.n_head + 2 * a.n_kv_head) * a.head_dim, bias=False)
        self.wo = nn.Linear(a.n_head * a.head_dim, a.dim, bias=False)
        self.resid_dropout = nn.Dropout(a.resid_dropout)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                pos: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        Hq, Hk, Dh = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.wqkv(x).split([Hq * Dh, Hk * Dh, Hk * Dh], dim=-1)
        q = apply_rope(q.view(B, T, Hq, Dh), rope).transpose(1, 2)  # (B, H, T, Dh)
        k = apply_rope(k.view(B, T, Hk, Dh), rope).transpose(1, 2)  # (B, K, T, Dh)
        v = v.view(B, T, Hk, Dh).transpose(1, 2)  # (B, K, T, Dh)
        if pos is not None:  # inference: write this step into the cache, attend to all of it
            assert self.cache is not None, "call setup_cache before cached decoding"
            k, v = self.cache.update(pos, k, v)  # (B, K, L, Dh)
        if Hk != Hq:
            k = k.repeat_interleave(Hq // Hk, dim=1)  # (B, H, L, Dh)
            v = v.repeat_interleave(Hq // Hk, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, Hq * Dh)  # (B, T, H*Dh)
        return self.resid_dropout(self.wo(y))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, a: TransformerArgs):
        super().__init__()
        self.w1 = nn.Linear(a.dim, a.ffn_hidden, bias=False)
        self.w3 = nn.Linear(a.dim, a.ffn_hidden, bias=False)
        self.w2 = nn.Linear(a.ffn_hidden, a.dim, bias=False)
        self.ffn_dropout = nn.Dropout(a.ffn_dropout)
        self.resid_dropout = nn.Dropout(a.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resid_dropout(self.w2(self.ffn_dropout(F.silu(self.w1(x)) * self.w3(x))))


class Block(nn.Module):
    def __init__(self, a: TransformerArgs):
        super().__init__()
        self.attention_norm = RMSNorm(a.dim, a.norm_eps)
        self.attention = Attention(a)
        self.ffn_norm = RMSNorm(a.dim, a.norm_eps)
        self.feed_forward = FeedForward(a)

    def forward(self, x, rope, mask, pos):
        x = x + self.attention(self.attention_norm(x), rope, mask, pos)
        return x + self.feed_forward(self.ffn_norm(x))


##################################################################################
#                                 Transformer                                    #
##################################################################################

class Transformer(nn.Module):
    """A stack of pre-norm blocks and a final RMSNorm: (B, T, D) -> (B, T, D)."""

    def __init__(self, a: TransformerArgs):
        super().__init__()
        self.args = a
        self.layers = nn.ModuleList(Block(a) for _ in range(a.n_layer))
        self.norm = RMSNorm(a.dim, a.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None,
                pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D); rope (T, Dh/2, 2); mask: None for plain causal attention over x,
        else a boolean (T, L) "may attend" mask (L = T, or the cache capacity when cached);
        pos (T,): the sequence positions of x; given, the layers read and write their KV
        cache (inference); None, attention covers x alone (training)."""
        for layer in self.layers:
            x = layer(x, rope, mask, pos)
        return self.norm(x)

    def setup_cache(self, batch: int, capacity: int, dtype: torch.dtype,
                    device: torch.device) -> None:
        """Allocate the KV cache, or keep the current one if it already has this shape: the
        same buffers across calls let a compiled decode step replay its CUDA graph."""
        a = self.args
        shape = (batch, a.n_kv_head, capacity, a.head_dim)
        old = self.layers[0].attention.cache if len(self.layers) else None
        if old is not None and old.k.shape == shape and old.k.dtype == dtype and old.k.device == device:
            return
        for layer in self.layers:
            layer.attention.cache = KVCache(batch, a.n_kv_head, capacity, a.head_dim, dtype, device)

    def clear_cache(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None


def rope_2d(rows: torch.Tensor, cols: torch.Tensor, head_dim: int,
            base: float = 10000.0) -> torch.Tensor:
    """2D rotary table (N, Dh/2, 2) of (cos, sin) for tokens at grid (rows, cols).

    The first half of the channel pairs turns with the row index and the second half with the
    column index, each half with frequencies base^(-4k/Dh), k = 0..Dh/4-1 (LlamaGen's layout).
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs a head width divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = base ** (-torch.arange(quarter, dtype=torch.float64, device=rows.device) * 4 / head_dim)
    angles = torch.cat([rows.double()[:, None] * freqs, cols.double()[:, None] * freqs], dim=-1)
    return torch.stack([angles.cos(), angles.sin()], dim=-1).float()  # (N, Dh/2, 2)
