"""Multi-scale residual VQ tokenizer (VAR's VQVAE): one image -> a coarse-to-fine pyramid of
code maps over a scale schedule `patch_nums`, which VAR's next-scale generator predicts in turn.

Follows FoundationVision/VAR models/vqvae.py, models/quant.py and models/basic_vae.py (commit
78b9539); written anew. Encoder/decoder parameter names equal VAR's; the phi convolutions,
which VAR keeps under three layouts (`quant_resi.qresi`, `quant_resi.{k}`,
`quant_resi.qresi_ls.{k}`), are one list `quantize.phi.{k}` here (convert/var_vqvae.py maps them).
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
from tokenizer.msvq_train import scale_code_stats
from tokenizer.msvq_nets import Decoder, Encoder
from tokenizer.quantizer import CodeTracker
from tokenizer.vq import ChannelNorm, init_convs_and_norms

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
    commit_beta: float = 0.25  # training: weight of the commitment loss (VAR's beta); unused by inference
    local_encoder: bool = False  # the VQ's local encoder instead of VAR's (tokenizer/msvq_nets.py); VAR's release: false

    def validate(self) -> None:
        if self.ch % 32:
            raise ConfigError(f"model.ch={self.ch} must be a multiple of 32 (GroupNorm with 32 groups)")
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError(f"model.ch_mult={self.ch_mult}: list at least one level, every multiplier >= 1")
        if self.codebook_size < 2:
            raise ConfigError(f"model.codebook_size={self.codebook_size} must be at least 2")
        check_fields(self, "model.", {"codebook_dim": ">= 1", "num_res_blocks": ">= 1",
                                      "dropout": "[0, 1)", "quant_resi": "[0, 1]",
                                      "share_quant_resi": ">= 0", "commit_beta": ">= 0"})
        pn = list(self.patch_nums)
        if not pn or min(pn) < 1 or any(a >= b for a, b in zip(pn, pn[1:])):
            raise ConfigError(f"model.patch_nums={pn} must be positive and strictly increasing "
                              f"(coarse to fine), e.g. {RELEASE_PATCH_NUMS}")


# ---------------------------------------------------------------- helpers

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


class MultiScaleQuantizer(CodeTracker):
    """The residual quantiser over the scale schedule; one codebook for all scales. Training
    tracks usage per scale (CodeTracker rows, non-persistent) and restarts dead codes."""

    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        self.patch_nums = list(cfg.patch_nums)
        self.ratio = abs(cfg.quant_resi)
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        count = phi_count(cfg)
        self.phi = nn.ModuleList([nn.Conv2d(cfg.codebook_dim, cfg.codebook_dim, 3, padding=1)
                                  for _ in range(count)])
        self.phi_of_scale = phi_indices(len(self.patch_nums), count)
        self.beta = cfg.commit_beta
        self.init_tracking((len(self.patch_nums), cfg.codebook_size))

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

    def residual_codes(self, f: torch.Tensor):
        """The residual quantisation of f (B, D, h, w), scale by scale, in float32 on f's value
        (no gradient into the search): yields, for each scale k, the residual it quantised
        (B pn_k^2, D), its indices (B, pn_k^2) row-major and its refined code map h_k
        (B, D, h, w), which the caller adds to f_hat."""
        B, D, H, W = f.shape
        if H != W or H != self.patch_nums[-1]:
            raise ValueError(f"latent {H}x{W} does not fit the scale schedule {self.patch_nums}, "
                             f"whose last scale must equal the latent side; encode images of "
                             f"{self.patch_nums[-1]} x the downsampling factor pixels")
        rest, last = f.detach().float().clone(), len(self.patch_nums) - 1
        for k, pn in enumerate(self.patch_nums):
            z = (rest if k == last else area(rest, pn)).permute(0, 2, 3, 1).reshape(-1, D)  # (B pn^2, D)
            with torch.no_grad():  # argmin has no gradient; skip the (N, V) graph
                idx = self.nearest(z).view(B, pn * pn)
            h = self.code_map(idx, k, H)
            rest = rest - h.detach()
            yield z, idx, h

    def quantize(self, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """f (B, D, h, w) -> (indices per scale (B, pn_k^2), cumulative f_hat after each scale)."""
        # f_hat starts as zeros in f's memory format (the local encoder's output is channels-
        # last), so the decoder's convolutions get that format and round as they always have
        f_hat, indices, f_hats = torch.zeros_like(f, dtype=torch.float32), [], []
        for _, idx, h in self.residual_codes(f):
            f_hat = f_hat + h
            indices.append(idx)
            f_hats.append(f_hat)
        return indices, f_hats

    def _sums(self, indices: list[torch.Tensor]):
        """The cumulative f_hat after each of the given scales, from the code maps alone."""
        side, f_hat = self.patch_nums[-1], 0
        for k, idx in enumerate(indices):
            f_hat = f_hat + self.code_map(idx, k, side)
            yield f_hat

    def f_hats(self, indices: list[torch.Tensor]) -> list[torch.Tensor]:
        """Indices per scale -> cumulative f_hat after each scale (the code maps alone)."""
        self.check_scales(indices)
        return list(self._sums(indices))

    def scale_inputs(self, indices: list[torch.Tensor], first: int = 1) -> torch.Tensor:
        """Next-scale inputs (B, n, D) of scales first..len(indices) (at most the last one)
        from the indices of scales 0..len(indices)-1: for scale j, the cumulative f_hat of
        scales < j area-downsampled to pn_j, row-major. All scales' indices give the teacher-
        forcing inputs of scales 1..S-1 (VAR's idxBl_to_var_input); the scales < s give scale
        s's input while generating (get_next_autoregressive_input)."""
        sums = self._sums(indices[:len(self.patch_nums) - 1])  # the last scale's sum feeds nothing
        parts = [area(f_hat, self.patch_nums[j]).flatten(2).transpose(1, 2)  # (B, pn_j^2, D)
                 for j, f_hat in enumerate(sums, start=1) if j >= first]
        if not parts:
            return self.embedding.weight.new_zeros(indices[0].shape[0], 0, self.embedding.embedding_dim)
        return torch.cat(parts, dim=1)

    def forward(self, f: torch.Tensor):
        """Training (VAR's VectorQuantizer2.forward): f (B, D, h, w) -> (f_hat valued, f's
        gradient (straight-through), {"codebook", "commit"} losses, statistics). The codes and
        f_hat are those of `quantize`."""
        # float32 even under autocast: bf16 distances mis-assign codes and the residual sum drifts
        with torch.autocast(f.device.type, enabled=False):
            f = f.float()
            f_no_grad, S = f.detach(), len(self.patch_nums)
            f_hat, codebook, commit = torch.zeros_like(f_no_grad), 0.0, 0.0  # f's format, as in quantize
            indices, quantised = [], []
            for z, idx, h in self.residual_codes(f):
                f_hat = f_hat + h
                # per scale, as VAR: the commitment pulls the encoder toward the sum so far, the
                # codebook term pulls the codes and phi convs toward the (fixed) feature
                commit = commit + F.mse_loss(f_hat.detach(), f)
                codebook = codebook + F.mse_loss(f_hat, f_no_grad)
                indices.append(idx)
                quantised.append(z)
            f_hat = f_hat.detach() - f_no_grad + f  # value f_hat, gradient to f (the encoder)
        losses = {"codebook": codebook / S, "commit": self.beta * commit / S}
        return f_hat, losses, scale_code_stats(indices, self.embedding.num_embeddings, torch.cat(quantised))

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
        init_convs_and_norms(self, (nn.GroupNorm, ChannelNorm))
        # VAR's eini(-1): codes start small and close together, inside the feature cloud
        v = self.cfg.codebook_size
        nn.init.uniform_(self.quantize.embedding.weight, -1 / v, 1 / v)

    def fit_problems(self, spec) -> list[str]:
        """... and another scale schedule, which fixes the grid (so it also says why the grids
        differ)."""
        if list(self.patch_nums) != list(spec.multiscale.patch_nums):
            return self.size_problems(spec) + [f"scale schedule {list(self.patch_nums)} vs the "
                                               f"generator's {list(spec.multiscale.patch_nums)}"]
        return super().fit_problems(spec)

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
        self.quantize.check_scales(indices)
        return self.quantize.scale_inputs(indices)

    def forward(self, images: torch.Tensor):
        """Training, the VQ's interface: (B, 3, H, W) -> (reconstruction, {"codebook",
        "commit"} losses, code statistics). Not clamped (as the VQ's): the loss keeps its
        gradient where the decoder overshoots [-1, 1]."""
        f_hat, losses, stats = self.quantize(self.features(images))
        return self.decoder(self.post_quant_conv(f_hat)), losses, stats

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
