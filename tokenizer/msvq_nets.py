"""VAR's VQVAE encoder and decoder (the convolutional halves of tokenizer/msvq.py), with an
optional local encoder.

Follows FoundationVision/VAR models/basic_vae.py (commit 78b9539); written anew, parameter names
equal VAR's so that convert/var_vqvae.py maps the release by an explicit table. GroupNorm(32)
+ SiLU res blocks, a 1x1 shortcut only where the width changes, self-attention only at the
lowest resolution and in the middle (one fused 1x1 qkv conv, scale C^-0.5).

The local encoder (`local_encoder`, not VAR's) is the VQ's (tokenizer/vq.py): per-position
LayerNorm over channels instead of GroupNorm, no attention and no middle block, no res blocks
at the lowest resolution and a 1x1 conv_out, so that each code sees a fixed window of pixels
and equal content gives equal codes wherever it sits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tokenizer.vq import ChannelNorm, Downsample, ResnetBlock, Upsample, run_level


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, q/k/v from one fused 1x1 conv (VAR's)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # each (B, C, HW)
        # explicit matmuls in VAR's order (not SDPA) so features match the release bit for bit
        w = torch.bmm(q.transpose(1, 2), k) * C ** -0.5  # (B, HW query, HW key)
        w = w.softmax(dim=2)
        h = torch.bmm(v, w.transpose(1, 2)).view(B, C, H, W)  # (B, C, HW query)
        return x + self.proj_out(h)


def _mid(c: int, dropout: float) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1 = ResnetBlock(c, c, dropout), AttnBlock(c)
    mid.block_2 = ResnetBlock(c, c, dropout)
    return mid


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, n, local = cfg.ch, len(cfg.ch_mult), cfg.local_encoder
        norm = ChannelNorm if local else _norm
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = ch
        for i, m in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            # the local encoder stops at the last downsampling: its receptive field stays small
            for _ in range(0 if (local and i == n - 1) else cfg.num_res_blocks):
                level.block.append(ResnetBlock(c, ch * m, cfg.dropout, norm))
                c = ch * m
                if i == n - 1:  # attention only at the lowest resolution
                    level.attn.append(AttnBlock(c))
            if i != n - 1:
                level.downsample = Downsample(c)
            self.down.append(level)
        self.mid = None if local else _mid(c, cfg.dropout)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, cfg.codebook_dim, 1 if local else 3, padding=0 if local else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level.block, level.attn, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        if self.mid is not None:
            h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, n = cfg.ch, len(cfg.ch_mult)
        c = ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.codebook_dim, c, 3, padding=1)
        self.mid = _mid(c, cfg.dropout)
        levels = []
        for i in reversed(range(n)):  # built lowest resolution first; up[i] is level i
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(c, ch * cfg.ch_mult[i], cfg.dropout))
                c = ch * cfg.ch_mult[i]
                if i == n - 1:
                    level.attn.append(AttnBlock(c))
            if i != 0:
                level.upsample = Upsample(c)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            h = run_level(level.block, level.attn, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


