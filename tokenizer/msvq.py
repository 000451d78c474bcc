"""Multi-scale residual VQ tokenizer (VAR's VQVAE): one image -> a coarse-to-fine pyramid of
code maps over a scale schedule `patch_nums`, which VAR's next-scale generator predicts in turn.

Follows FoundationVision/VAR models/vqvae.py, models/quant.py and models/basic_vae.py (commit
78b9539); written anew. Encoder/decoder parameter names equal VAR's; the phi convolutions,
which VAR keeps under three layouts (`quant_resi.qresi`, `quant_resi.{k}`,
`quant_resi.qresi_ls.{k}`), are one list `quantize.phi.{k}` here (convert/var.py maps them).
VAR's persistent buffer `quantize.ema_vocab_hit_SV` (an EMA of code hits per scale, a training
statistic that inference never reads) is not kept: the converter checks its row count against
the scale schedule and drops it.

Quantisation of a feature f (B, Cvae, h, w), h = w = patch_nums[-1]:
    rest = f, f_hat = 0; for scale k: z = area(rest -> pn_k); idx = nearest code of z;
    h_k = phi_k(bicubic(codebook[idx] -> h)); f_hat += h_k; rest -= h_k
(no resizing at the last scale). phi_k(x) = (1 - r) x + r conv3x3_k(x), r = |quant_resi|.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError, check_fields
from tokenizer.base import ImageTokenizer
from tokenizer.vq import Downsample, ResnetBlock, Upsample, init_convs_and_norms, run_level

RELEASE_PATCH_NUMS = [1, 2, 3, 4, 5, 6, 8, 10, 13, 16]  # VAR's 256px schedule (L = 680)


@dataclass
class MSVQConfig:
    name: str = "msvq"  # tokenizer family; picks the class when the weights are loaded
    codebook_size: int = 4096  # number of codes, one codebook shared by all scales
    codebook_dim: int = 32  # channels of a code vector (VAR's Cvae); also the encoder's output width
    ch: int = 160  # base channels of encoder and decoder (a multiple of 32: GroupNorm(32))
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # channel multiplier per level; len-1 downsamplings
    num_res_blocks: int = 2  # res blocks per encoder level (the decoder has one more)
    dropout: float = 0.0  # dropout inside res blocks
    patch_nums: list[int] = field(default_factory=lambda: list(RELEASE_PATCH_NUMS))  # side of each scale's code map, coarse to fine; the last is the latent side
    quant_resi: float = 0.5  # r of phi(x) = (1 - r) x + r conv3x3(x); 0: no phi convolutions
    share_quant_resi: int = 4  # phi convolutions: 1 = one shared, 0 = one per scale, K >= 2 = K spread over the scales

    def validate(self) -> None:
        if self.ch % 32:
            raise ConfigError(f"model.ch={self.ch} must be a multiple of 32 (GroupNorm with 32 groups)")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(f"model.ch_mult={self.ch_mult}: list at least one level, every multiplier >= 1")
        if self.codebook_size < 2:
            raise ConfigError(f"model.codebook_size={self.codebook_size} must be at least 2")
        check_fields(self, "model.", {"codebook_dim": ">= 1", "num_res_blocks": ">= 1",
                                      "dropout": "[0, 1)", "quant_resi": "[0, 1]",
                                      "share_quant_resi": ">= 0"})
        pn = list(self.patch_nums)
        if not pn or min(pn) < 1 or any(a >= b for a, b in zip(pn, pn[1:])):
            raise ConfigError(f"model.patch_nums={pn} must be positive and strictly increasing "
                              f"(coarse to fine), e.g. {RELEASE_PATCH_NUMS}")


# ---------------------------------------------------------------- helpers

def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def phi_count(cfg: MSVQConfig) -> int:
    """How many phi convolutions the config has."""
    if abs(cfg.quant_resi) <= 1e-6:  # VAR uses the identity then
        return 0
    return len(cfg.patch_nums) if cfg.share_quant_resi == 0 else cfg.share_quant_resi


def phi_ticks(count: int) -> np.ndarray:
    """Where each of `count` phi convs sits on [0, 1]; VAR spaces 4 of them differently."""
    K = count
    # written as VAR writes it: 1/3/K and 1/12 may round differently, and ties are decided by rounding
    return np.linspace(1 / 3 / K, 1 - 1 / 3 / K, K) if K == 4 else np.linspace(1 / 2 / K, 1 - 1 / 2 / K, K)


def phi_indices(num_scales: int, count: int) -> list[int]:
    """The phi conv used at each scale: the tick nearest to k / (S - 1), in float64, first index on
    ties. Some scales are exact ties in real arithmetic (2/9 and 7/9 of 10 scales with 4 convs),
    so this must be the float computation, not fractions: 10 scales, 4 convs -> [0,0,1,1,1,2,2,3,3,3]."""
    if count == 0:
        return [-1] * num_scales
    ticks = phi_ticks(count)
    at = [k / (num_scales - 1) if num_scales > 1 else 0.0 for k in range(num_scales)]
    return [int(np.argmin(np.abs(ticks - a))) for a in at]


def area(x: torch.Tensor, side: int) -> torch.Tensor:
    """VAR's 'area' resize: adaptive average pooling (overlapping windows where side does not
    divide the input), not a stride/kernel pool."""
    return F.adaptive_avg_pool2d(x, side)


def bicubic(x: torch.Tensor, side: int) -> torch.Tensor:
    """PyTorch's bicubic (A = -0.75, half-pixel centres, no antialias, no clamp), as VAR."""
    return F.interpolate(x, size=(side, side), mode="bicubic", align_corners=False)


# ---------------------------------------------------------------- blocks

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
    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        ch, n = cfg.ch, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = ch
        for i, m in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(c, ch * m, cfg.dropout))
                c = ch * m
                if i == n - 1:  # attention only at the lowest resolution
                    level.attn.append(AttnBlock(c))
            if i != n - 1:
                level.downsample = Downsample(c)
            self.down.append(level)
        self.mid = _mid(c, cfg.dropout)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, cfg.codebook_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = run_level(level.block, level.attn, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: MSVQConfig):
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


class MultiScaleQuantizer(nn.Module):
    """The residual quantiser over the scale schedule; one codebook for all scales."""

    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        self.patch_nums = list(cfg.patch_nums)
        self.ratio = abs(cfg.quant_resi)
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        count = phi_count(cfg)
        self.phi = nn.ModuleList([nn.Conv2d(cfg.codebook_dim, cfg.codebook_dim, 3, padding=1)
                                  for _ in range(count)])
        self.phi_of_scale = phi_indices(len(self.patch_nums), count)

    def refine(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """phi of scale k, at latent resolution (after the upsampling)."""
        if not len(self.phi):
            return h
        return h * (1 - self.ratio) + self.phi[self.phi_of_scale[k]](h) * self.ratio

    def nearest(self, z: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """(N, D) -> (N,) nearest code by squared euclidean distance (no l2 normalisation)."""
        e = self.embedding.weight
        e2 = e.square().sum(1)  # (V,)
        out = []
        for zc in z.split(chunk):  # the (N, V) distances of a large batch would take GBs
            d = zc.square().sum(1, keepdim=True) + e2  # |z|^2 + |e|^2 - 2 z.e, in VAR's order
            out.append(torch.addmm(d, zc, e.t(), beta=1, alpha=-2).argmin(dim=1))
        return torch.cat(out)

    def code_map(self, idx: torch.Tensor, k: int, side: int) -> torch.Tensor:
        """Scale k's indices (B, pn^2) -> its refined contribution to f_hat (B, D, side, side)."""
        pn = self.patch_nums[k]
        h = self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], -1, pn, pn)  # (B, D, pn, pn)
        if k != len(self.patch_nums) - 1:
            h = bicubic(h, side)
        return self.refine(h.contiguous(), k)

    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """f (B, D, h, w) -> (indices per scale (B, pn_k^2), cumulative f_hat after each scale)."""
        B, D, H, W = f.shape
        if H != W or H != self.patch_nums[-1]:
            raise ValueError(f"latent {H}x{W} does not fit the scale schedule {self.patch_nums}, "
                             f"whose last scale must equal the latent side; encode images of "
                             f"{self.patch_nums[-1]} x the downsampling factor pixels")
        rest, f_hat = f.float().clone(), torch.zeros_like(f, dtype=torch.float32)
        indices, f_hats = [], []
        for k, pn in enumerate(self.patch_nums):
            z = rest if k == len(self.patch_nums) - 1 else area(rest, pn)
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, D)).view(B, pn * pn)  # row-major
            h = self.code_map(idx, k, H)
            f_hat = f_hat + h
            rest = rest - h
            indices.append(idx)
            f_hats.append(f_hat)
        return indices, f_hats

    def f_hats(self, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Indices per scale -> cumulative f_hat after each scale (the code maps alone)."""
        self.check_scales(indices)
        side = self.patch_nums[-1]
        f_hat, out = 0, []
        for k, idx in enumerate(indices):
            f_hat = f_hat + self.code_map(idx, k, side)
            out.append(f_hat)
        return out

    def check_scales(self, indices: list[torch.Tensor]) -> None:
        got = [tuple(i.shape[1:]) for i in indices]
        want = [(pn * pn,) for pn in self.patch_nums]
        if got != want:
            raise ValueError(f"indices per scale have shapes {got}; the tokenizer's scale "
                             f"schedule {self.patch_nums} needs {want}")


# ---------------------------------------------------------------- model

class MSVQModel(ImageTokenizer):
    kind = "multiscale"  # discrete codes, one map per scale

    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.downsample = 2 ** (len(cfg.ch_mult) - 1)
        self.codebook_size = cfg.codebook_size
        self.patch_nums = list(cfg.patch_nums)
        self.seq_len = sum(pn * pn for pn in self.patch_nums)  # L: tokens of all scales
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.codebook_dim, 3, padding=1)
        self.quantize = MultiScaleQuantizer(cfg)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.codebook_dim, 3, padding=1)
        self.decoder = Decoder(cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_convs_and_norms(self)
        # VAR's eini(-1): codes start small and close together, inside the feature cloud
        v = self.cfg.codebook_size
        nn.init.uniform_(self.quantize.embedding.weight, -1 / v, 1 / v)

    def grid(self, resolution: int) -> tuple[int, int]:
        """The last (finest) scale's grid; the schedule fixes the resolution."""
        h, w = super().grid(resolution)
        if h != self.patch_nums[-1]:
            raise ValueError(f"resolution {resolution} gives a {h}x{w} latent, but the scale "
                             f"schedule {self.patch_nums} ends at {self.patch_nums[-1]}: use "
                             f"{self.patch_nums[-1] * self.downsample} px images")
        return h, w

    # ---- the multi-scale interface (what VAR's generator uses)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> the feature that is quantised, (B, Cvae, h, w)."""
        return self.quant_conv(self.encoder(images))

    @torch.no_grad()
    def encode_scales(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> indices of each scale, (B, pn_k^2) int64 row-major."""
        return self.quantize.quantize(self.features(images))[0]

    @torch.no_grad()
    def f_hats(self, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Indices per scale -> cumulative quantised feature after each scale, (B, Cvae, h, w)."""
        return self.quantize.f_hats(indices)

    @torch.no_grad()
    def next_scale_inputs(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing inputs (B, L - pn_0^2, Cvae): for each scale k >= 1 the cumulative
        f_hat of scales < k area-downsampled to pn_k, row-major (VAR's idxBl_to_var_input)."""
        f_hats = self.f_hats(indices)[:-1]  # the last scale's sum feeds nothing
        B, D = indices[0].shape[0], self.cfg.codebook_dim
        parts = [area(f, pn).reshape(B, D, pn * pn).transpose(1, 2)  # (B, pn^2, D)
                 for f, pn in zip(f_hats, self.patch_nums[1:])]
        return torch.cat(parts, dim=1) if parts else torch.zeros(B, 0, D)

    def decode_f_hat(self, f_hat: torch.Tensor) -> torch.Tensor:
        """(B, Cvae, h, w) summed feature -> images in [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    @torch.no_grad()
    def decode_indices(self, indices: list[torch.Tensor]) -> torch.Tensor:
        """Indices per scale -> images (B, 3, H, W) in [-1, 1]."""
        return self.decode_f_hat(self.f_hats(indices)[-1])

    # ---- the single-sequence interface of every tokenizer

    def split(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) concatenated codes -> indices per scale, coarse to fine."""
        if codes.dim() != 2 or codes.shape[1] != self.seq_len:
            raise ValueError(f"codes of shape {tuple(codes.shape)}; the scale schedule "
                             f"{self.patch_nums} needs (B, {self.seq_len})")
        return list(codes.long().split([pn * pn for pn in self.patch_nums], dim=1))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> all scales' codes concatenated, (B, L) int64."""
        return torch.cat(self.encode_scales(images), dim=1)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, L) concatenated codes -> images (B, 3, H, W) in [-1, 1]."""
        return self.decode_indices(self.split(codes))
