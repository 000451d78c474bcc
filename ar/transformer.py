"""The backbone: one pre-norm block with a few switches, 2D rotary attention with an optional
static KV cache. It maps embeddings to hidden states and knows nothing of tokens, heads,
conditions or generation orders.

The switches (`TransformerArgs`) are what released families differ in, so that their weights
load exactly; the defaults are LlamaGen's block:

    switch              LlamaGen (default)        xAR                        VAR
    block norm          RMSNorm, affine           RMSNorm, no affine         LayerNorm, no affine
    norm eps            1e-5                      1e-6                       1e-6
    feed-forward        SwiGLU (SiLU gate)        GELU-gated (timm SwiGLU    fc1, GELU (tanh), fc2
                                                  with nn.GELU)
    hidden width        8/3 d rounded up to 256   int(8/3 d)                 4 d
    biases              none                      on qkv, out projection,    on q and v (not k),
                                                  MLP                        out projection, MLP
    attention logits    q.k / sqrt(dh)            q.k / sqrt(dh)             l2-normalised q and k,
                                                                             q times a learned per-
                                                                             head scale (clamped)
    adaLN               none                      six-way from a conditioning vector per token
    final norm          RMSNorm with weight       RMSNorm with weight        adaLN (scale, shift)
    input norm          none                      RMSNorm with weight after the input tables
    two halves          one stack                 norm, Linear and a second learned position
                                                  table between the halves (MAR's enc/dec)

adaLN (DiT's pattern, xAR's and VAR's chunk order): SiLU then Linear(d, 6d) of the vector gives
gamma1, gamma2, scale1, scale2, shift1, shift2 and a block computes
    h = x + gamma1 * attn(norm(x) * (1 + scale1) + shift1)
    out = h + gamma2 * mlp(norm(h) * (1 + scale2) + shift2).
The vectors arrive as `ada = (vectors (B, S, D), index (T,) or None)`: position t uses row
index[t] (e.g. its step's timestep vector), or row 0 for all when index is None; the Linear
runs on the S distinct rows only.

Adapted from: LlamaGen `autoregressive/models/gpt.py` and gpt-fast `model.py` (block layout,
fused `wqkv`, static cache written by index); xAR `models/xar.py` (the switches' semantics).
Written anew; the cache is an explicit object and attention over it uses a length mask built
from positions, not hidden model state.

Shape letters: B batch, T sequence, D width, H query heads, K key/value heads, Dh head width,
L cache capacity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

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
    attn_dropout: float = 0.0  # dropout on attention probabilities (training only)
    drop_path: float = 0.0  # stochastic depth: a residual branch dropped per sample, rate rising linearly to this at the last block (VAR)
    block_norm: str = "rms"  # the blocks' norm: rms (RMSNorm) | layer (LayerNorm)
    block_norm_affine: bool = True  # a learned weight in the blocks' norms
    ffn: str = "gated"  # feed-forward: gated (w2(act(w1 x) * w3 x)) | mlp (w2(act(w1 x)))
    ffn_gate: str = "silu"  # its activation: silu | gelu (exact erf) | gelu_tanh
    bias: bool = False  # biases on qkv, the attention output and the feed-forward Linears
    k_bias: bool = True  # with bias: also on the keys (VAR: q and v only)
    qk_norm: bool = False  # l2-normalise q and k per head, q times exp(min(learned, ln 100)), logit scale 1 (VAR)
    final_adaln: bool = False  # the final norm modulated by (scale, shift) from the adaLN vector (VAR's head_nm)
    adaln: bool = False  # six-way adaLN modulation of every block from a conditioning vector
    input_norm: bool = False  # an RMSNorm with weight on the inputs before the first block
    split: int = 0  # blocks in the first half of a two-half stack (0: one stack)
    capacity: int = 0  # positions of the second half's learned table (two-half stacks)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


##################################################################################
#                                   Helpers                                      #
##################################################################################

def apply_rope(x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
    """Rotate interleaved (even, odd) channel pairs of x by the angles tabulated in `rope`.

    x: (B, T, H, Dh); rope: (T, Dh/2, 2) holding (cos, sin), or (B, T, Dh/2, 2), or None (no
    rotary embedding: VAR). A zero row (LlamaGen's table at condition positions) zeroes q/k
    there. Done in float32, as rotations of large angles in bf16 lose the position information.
    """
    if rope is None:
        return x
    xf = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, Dh/2, 2)
    if rope.dim() == 3:
        rope = rope.unsqueeze(0)
    cos, sin = rope[..., 0].unsqueeze(2), rope[..., 1].unsqueeze(2)  # (B|1, T, 1, Dh/2)
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).type_as(x)


class LayerNorm(nn.Module):
    """LayerNorm over the last dim, in float32, with an optional weight (no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x)
        return y if self.weight is None else y * self.weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in float32 so bf16 activations keep their scale
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) if self.weight is None else xf.type_as(x) * self.weight


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
        """Write k, v (B, K, T, Dh) at positions `pos`, (T,) for every row or (B, T) per row
        (rows that have advanced by different amounts, as speculative decoding's); return the
        whole cache. What a position held before is overwritten (a rejected draft's entry)."""
        if pos.dim() == 1:
            self.k.index_copy_(2, pos, k.to(self.k.dtype))
            self.v.index_copy_(2, pos, v.to(self.v.dtype))
        else:
            index = pos[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])  # (B, K, T, Dh)
            self.k.scatter_(2, index, k.to(self.k.dtype))
            self.v.scatter_(2, index, v.to(self.v.dtype))
        return self.k, self.v


##################################################################################
#                                   Blocks                                       #
##################################################################################

class Attention(nn.Module):
    def __init__(self, a: TransformerArgs):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = a.n_head, a.n_kv_head, a.head_dim
        # fused projection: H query heads then K key heads then K value heads
        self.wqkv = nn.Linear(a.dim, (a.n_head + 2 * a.n_kv_head) * a.head_dim, bias=a.bias)
        if a.bias and not a.k_bias:  # the key part of the bias stays 0 (VAR's zero_k_bias)
            keep = torch.ones(self.wqkv.out_features, device="cpu")  # real even under a meta build
            keep[a.n_head * a.head_dim:(a.n_head + a.n_kv_head) * a.head_dim] = 0
            self.register_buffer("bias_keep", keep, persistent=False)
        else:
            self.bias_keep = None
        # VAR's l2-normalised attention: a learned log scale per head, clamped at ln 100
        self.scale_log = nn.Parameter(torch.full((a.n_head,), math.log(4.0))) if a.qk_norm else None
        self.wo = nn.Linear(a.n_head * a.head_dim, a.dim, bias=a.bias)
        self.resid_dropout = nn.Dropout(a.resid_dropout)
        self.attn_dropout = a.attn_dropout
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None,
                pos: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        Hq, Hk, Dh = self.n_head, self.n_kv_head, self.head_dim
        bias = self.wqkv.bias if self.bias_keep is None else self.wqkv.bias * self.bias_keep
        q, k, v = F.linear(x, self.wqkv.weight, bias).split([Hq * Dh, Hk * Dh, Hk * Dh], dim=-1)
        q = apply_rope(q.view(B, T, Hq, Dh), rope).transpose(1, 2)  # (B, H, T, Dh)
        k = apply_rope(k.view(B, T, Hk, Dh), rope).transpose(1, 2)  # (B, K, T, Dh)
        scale = None
        if self.scale_log is not None:  # cached keys are stored normalised
            scale = 1.0
            q = F.normalize(q, dim=-1) * self.scale_log.clamp(max=math.log(100.0)).exp()[:, None, None]
            k = F.normalize(k, dim=-1)
        v = v.view(B, T, Hk, Dh).transpose(1, 2)  # (B, K, T, Dh)
        if pos is not None:  # inference: write this step into the cache, attend to all of it
            assert self.cache is not None, "call setup_cache before cached decoding"
            k, v = self.cache.update(pos, k, v)  # (B, K, L, Dh)
        if Hk != Hq:
            k = k.repeat_interleave(Hq // Hk, dim=1)  # (B, H, L, Dh)
            v = v.repeat_interleave(Hq // Hk, dim=1)
        p = self.attn_dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p, scale=scale)
        else:
            if mask.dim() == 3:  # per-row masks (B, T, L): one for all heads
                mask = mask[:, None]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
        y = y.transpose(1, 2).reshape(B, T, Hq * Dh)  # (B, T, H*Dh)
        return self.resid_dropout(self.wo(y))


GATES = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": partial(F.gelu, approximate="tanh")}
NORMS = {"rms": RMSNorm, "layer": LayerNorm}


class FeedForward(nn.Module):
    """Gated, w2(act(w1 x) * w3 x) (SwiGLU with SiLU), or plain, w2(act(w1 x)) (VAR)."""

    def __init__(self, a: TransformerArgs):
        super().__init__()
        self.gate = GATES[a.ffn_gate]
        self.w1 = nn.Linear(a.dim, a.ffn_hidden, bias=a.bias)
        self.w3 = nn.Linear(a.dim, a.ffn_hidden, bias=a.bias) if a.ffn == "gated" else None
        self.w2 = nn.Linear(a.ffn_hidden, a.dim, bias=a.bias)
        self.ffn_dropout = nn.Dropout(a.ffn_dropout)
        self.resid_dropout = nn.Dropout(a.resid_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate(self.w1(x)) if self.w3 is None else self.gate(self.w1(x)) * self.w3(x)
        return self.resid_dropout(self.w2(self.ffn_dropout(h)))


def modulation_of(layer: nn.Module, ada, parts: int = 6) -> list[torch.Tensor]:
    """The adaLN vectors (each (B, T|1, D)) of one modulation layer for ada = (vectors, index):
    a block's six (gamma1, gamma2, scale1, scale2, shift1, shift2), or the final norm's two
    (scale, shift)."""
    vectors, index = ada
    mod = layer(vectors)  # (B, S, parts x D), on the distinct vectors only
    if index is not None:
        mod = mod[:, index]  # (B, T, parts x D)
    return list(mod.chunk(parts, dim=-1))


def drop_path(x: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero the whole branch of each sample with probability `rate`, scale
    the kept ones by 1 / (1 - rate) (training only)."""
    if rate == 0.0 or not training:
        return x
    keep = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device) >= rate  # (B, 1, 1)
    return x * keep.to(x.dtype) / (1 - rate)


class Block(nn.Module):
    def __init__(self, a: TransformerArgs, drop_rate: float = 0.0):
        super().__init__()
        self.drop_rate = drop_rate  # this block's stochastic-depth rate
        norm = NORMS[a.block_norm]
        self.attention_norm = norm(a.dim, a.norm_eps, a.block_norm_affine)
        self.attention = Attention(a)
        self.ffn_norm = norm(a.dim, a.norm_eps, a.block_norm_affine)
        self.feed_forward = FeedForward(a)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(a.dim, 6 * a.dim)) if a.adaln else None

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_rate, self.training)

    def forward(self, x, rope, mask, pos, ada=None):
        drop = self._drop
        if self.modulation is None:
            x = x + drop(self.attention(self.attention_norm(x), rope, mask, pos))
            return x + drop(self.feed_forward(self.ffn_norm(x)))
        gamma1, gamma2, scale1, scale2, shift1, shift2 = modulation_of(self.modulation, ada)
        x = x + drop(gamma1 * self.attention(self.attention_norm(x) * (1 + scale1) + shift1, rope, mask, pos))
        return x + drop(gamma2 * self.feed_forward(self.ffn_norm(x) * (1 + scale2) + shift2))


##################################################################################
#                                 Transformer                                    #
##################################################################################

class Transformer(nn.Module):
    """A stack of pre-norm blocks and a final RMSNorm: (B, T, D) -> (B, T, D); optionally an
    input norm, and two halves joined by a norm, a Linear and a second position table."""

    def __init__(self, a: TransformerArgs):
        super().__init__()
        self.args = a
        self.input_norm = RMSNorm(a.dim, a.norm_eps) if a.input_norm else None
        rates = torch.linspace(0, a.drop_path, a.n_layer, device="cpu").tolist()  # timm's and VAR's rule
        self.layers = nn.ModuleList(Block(a, rate) for rate in rates)
        if a.split:
            self.mid_norm = RMSNorm(a.dim, a.norm_eps)
            self.mid_proj = nn.Linear(a.dim, a.dim)
            self.mid_pos = nn.Parameter(torch.zeros(a.capacity, a.dim))  # (L, D) by position
        else:
            self.mid_norm = self.mid_proj = self.mid_pos = None
        if a.final_adaln:  # VAR's AdaLNBeforeHead: norm without weight, then (scale, shift)
            self.norm = NORMS[a.block_norm](a.dim, a.norm_eps, affine=False)
            self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(a.dim, 2 * a.dim))
        else:
            self.norm = RMSNorm(a.dim, a.norm_eps)
            self.final_modulation = None

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None,
                pos: torch.Tensor | None = None, ada=None) -> torch.Tensor:
        """x (B, T, D); rope (T | B x T, Dh/2, 2) or None; mask: None for plain causal attention
        over x, else a boolean (T, L) or per-row (B, T, L) "may attend" mask (L = T, or the cache
        capacity when cached); pos (T,) or per row (B, T): the sequence positions of x; given,
        the layers read and write their KV cache (inference); None, attention covers x alone
        (training) from position 0.
        ada: (vectors (B, S, D), index (T,) | None) for adaLN blocks, else None."""
        if self.input_norm is not None:
            x = self.input_norm(x)
        for i, layer in enumerate(self.layers):
            if i == self.args.split and i:
                x = self._between_halves(x, pos)
            x = layer(x, rope, mask, pos, ada)
        if self.final_modulation is None:
            return self.norm(x)
        scale, shift = modulation_of(self.final_modulation, ada, parts=2)
        return self.norm(x) * (1 + scale) + shift

    def _between_halves(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        table = self.mid_pos[pos] if pos is not None else self.mid_pos[: x.shape[1]]  # (T, D)
        return self.mid_proj(self.mid_norm(x)) + table.to(x.dtype)

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
