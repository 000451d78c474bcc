"""The interface every image tokenizer implements, discrete (VQ) or continuous (KL/VAE).

A tokenizer is frozen while the generator trains: it maps images in [-1, 1] to a grid of codes
(or latents) and back. The generator only ever sees `kind`, `grid(resolution)` and either
`codebook_size` (discrete) or `latent_channels` (continuous).
"""

from __future__ import annotations

import torch
from torch import nn


class ImageTokenizer(nn.Module):
    kind: str = "discrete"  # "discrete": integer codes; "continuous": float latents
    downsample: int = 16  # image pixels per code along each side
    codebook_size: int | None = None  # number of codes (discrete tokenizers)
    latent_channels: int | None = None  # channels per latent position (continuous tokenizers)

    def grid(self, resolution: int) -> tuple[int, int]:
        """Code-grid size (h, w) for square images of side `resolution`."""
        if resolution % self.downsample:
            raise ValueError(f"resolution {resolution} is not a multiple of the tokenizer's "
                             f"downsampling factor {self.downsample}")
        side = resolution // self.downsample
        return side, side

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> codes (B, h, w) int64, or latents (B, C, h, w)."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, h, w) int64, or latents (B, C, h, w) -> images (B, 3, H, W) in [-1, 1]."""
        raise NotImplementedError
