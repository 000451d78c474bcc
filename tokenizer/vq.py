"""VQGAN tokenizer with an l2-normalised codebook, in LlamaGen's VQ-16 layout.

Architecture follows LlamaGen's VQModel (FoundationVision/LlamaGen
tokenizer/tokenizer_image/vq_model.py); written anew. Parameter names and shapes equal
LlamaGen's, so its released checkpoints load by a key map that only drops the persistent
`quantize.codebook_used` buffer (ours keeps usage statistics in a non-persistent buffer).
The quantiser (nearest code, usage tracking, dead-code restarts) is tokenizer/quantizer.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError, check_fields
from tokenizer.base import ImageTokenizer
from tokenizer.quantizer import VectorQuantizer


@dataclass
class VQConfig:
    name: str = "vq"  # tokenizer family; picks the class when the weights are loaded
    codebook_size: int = 16384  # number of codes
    codebook_dim: int = 8  # channels of a code vector (LlamaGen: 8)
    ch: int = 128  # base channels of encoder and decoder (a multiple of 32: GroupNorm(32))
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # channel multiplier per level; len-1 downsamplings
    num_res_blocks: int = 2  # res blocks per encoder level (the decoder has one more)
    z_channels: int = 256  # channels of the encoder output before quant_conv
    dropout: float = 0.0  # dropout inside res blocks
    commit_beta: float = 0.25  # weight of the commitment loss
    l2_norm: bool = True  # l2-normalise latents and codebook before the nearest-code search
    # A local encoder (off in LlamaGen): per-position LayerNorm over channels instead of GroupNorm,
    # no attention and no mid block, no res blocks at the lowest resolution and a 1x1 conv_out.
    # Each code then depends on a fixed window of pixels only (21 px for ch_mult [1, 1, 2] and one res block), so
    # equal content gives equal codes wherever it sits and whatever else is in the image; see
    # configs/tokenizer/quickstart.yaml for what that did to the generator's loss.
    local_encoder: bool = False

    def validate(self) -> None:
        if self.ch % 32:
            raise ConfigError(f"model.ch={self.ch} must be a multiple of 32 (GroupNorm with 32 groups)")
        if not self.ch_mult:
            raise ConfigError("model.ch_mult must list at least one level")
        if self.codebook_size < 2:
            raise ConfigError(f"model.codebook_size={self.codebook_size} must be at least 2")
        check_fields(self, "model.", {"codebook_dim": ">= 1", "num_res_blocks": ">= 0",
                                      "z_channels": ">= 1", "dropout": "[0, 1)", "commit_beta": ">= 0"})
        if min(self.ch_mult) < 1:
            raise ConfigError(f"model.ch_mult={self.ch_mult}: every multiplier must be >= 1")


# ---------------------------------------------------------------- helpers

def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ChannelNorm(nn.Module):
    """LayerNorm over the channels at each position: unlike GroupNorm, no statistics over space."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
        return h.permute(0, 3, 1, 2)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x)  # x * sigmoid(x), fused


# ---------------------------------------------------------------- blocks

class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, dropout: float = 0.0, norm=_norm):
        super().__init__()
        self.norm1 = norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # a 1x1 projection only where the residual changes width (LlamaGen's key name)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, HW, C): one head whose width is all channels
        q, k, v = (t(h).reshape(B, 1, C, H * W).transpose(2, 3) for t in (self.q, self.k, self.v))
        o = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        o = o.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(o)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # asymmetric zero pad (right/bottom) so a stride-2 3x3 conv halves even sizes exactly
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c, dropout), AttnBlock(c), ResnetBlock(c, c, dropout)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mults, ch, L = cfg.ch_mult, cfg.ch, len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c = ch
        local = cfg.local_encoder
        norm = ChannelNorm if local else _norm
        for i, m in enumerate(mults):
            level = nn.Module()
            res, attn = nn.ModuleList(), nn.ModuleList()
            # the local encoder stops at the last downsampling: its receptive field stays small
            for _ in range(0 if (local and i == L - 1) else cfg.num_res_blocks):
                res.append(ResnetBlock(c, ch * m, cfg.dropout, norm))
                c = ch * m
                if i == L - 1:  # attention only at the lowest resolution, where it is cheap
                    attn.append(AttnBlock(c))
            level.res, level.attn = res, attn
            if i != L - 1:
                level.downsample = Downsample(c)
            self.conv_blocks.append(level)
        self.mid = nn.ModuleList() if local else _mid(c, cfg.dropout)
        self.norm_out = norm(c)
        self.conv_out = nn.Conv2d(c, cfg.z_channels, 1 if local else 3, padding=0 if local else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = run_level(level.res, level.attn, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(_swish(self.norm_out(h)))


def init_convs_and_norms(module: nn.Module, norms: tuple = (nn.GroupNorm,)) -> None:
    """PyTorch's conv default made explicit, zero conv biases, identity norms."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))
            nn.init.zeros_(m.bias)
        elif isinstance(m, norms):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def run_level(blocks: nn.ModuleList, attn: nn.ModuleList, h: torch.Tensor) -> torch.Tensor:
    """One resolution level: its res blocks, each followed by attention where the level has it."""
    for j, block in enumerate(blocks):
        h = block(h)
        if len(attn):
            h = attn[j](h)
    return h


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        mults, ch, L = cfg.ch_mult, cfg.ch, len(cfg.ch_mult)
        c = ch * mults[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = _mid(c, cfg.dropout)
        self.conv_blocks = nn.ModuleList()
        for i, m in enumerate(reversed(mults)):  # block 0 is the lowest resolution
            level = nn.Module()
            res, attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResnetBlock(c, ch * m, cfg.dropout))
                c = ch * m
                if i == 0:
                    attn.append(AttnBlock(c))
            level.res, level.attn = res, attn
            if i != L - 1:
                level.upsample = Upsample(c)
            self.conv_blocks.append(level)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the VQGAN adaptive GAN weight measures gradient norms at."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = run_level(level.res, level.attn, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


# ---------------------------------------------------------------- model

class VQModel(ImageTokenizer):
    kind = "discrete"

    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.downsample = 2 ** (len(cfg.ch_mult) - 1)
        self.codebook_size = cfg.codebook_size
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg.codebook_size, cfg.codebook_dim, cfg.commit_beta, cfg.l2_norm)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        init_convs_and_norms(self, (nn.GroupNorm, ChannelNorm))
        # zero the residual branches' last conv so every block starts as the identity
        for m in self.modules():
            if isinstance(m, ResnetBlock):
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, AttnBlock):
                nn.init.zeros_(m.proj_out.weight)
        # random directions on the sphere: codes start spread out, none coincide
        nn.init.normal_(self.quantize.embedding.weight)
        with torch.no_grad():
            w = self.quantize.embedding.weight
            w.copy_(F.normalize(w, dim=-1))

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pre-quantisation latent (B, codebook_dim, h, w)."""
        return self.quant_conv(self.encoder(images))

    def decode_latent(self, zq: torch.Tensor) -> torch.Tensor:
        """(B, codebook_dim, h, w) quantised latent -> images (B, 3, H, W)."""
        return self.decoder(self.post_quant_conv(zq))

    def forward(self, images: torch.Tensor):
        zq, _, losses, stats = self.quantize(self.encode_latent(images))
        return self.decode_latent(zq), losses, stats

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        _, idx, _, _ = self.quantize(self.encode_latent(images))
        return idx  # (B, h, w) int64

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        zq = self.quantize.codebook()[codes.long()]  # (B, h, w, D)
        return self.decode_latent(zq.permute(0, 3, 1, 2).contiguous())
