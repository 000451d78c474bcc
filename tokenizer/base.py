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

    def fit_problems(self, spec) -> list[str]:
        """Why this tokenizer's codes would not fit a generator (`spec`: ar's GeneratorSpec):
        another codebook (channels, for continuous tokenizers) or another grid."""
        return self.size_problems(spec) + self.grid_problems(spec)

    def size_problems(self, spec) -> list[str]:
        if self.codebook_size != spec.vocab_size:
            return [f"codebook {self.codebook_size} codes vs the generator's {spec.vocab_size}"]
        return []

    def grid_problems(self, spec) -> list[str]:
        """The latent grid of the generator's image side. Where the tokenizer's own geometry
        refuses that side (a downsampling factor that does not divide it, a scale schedule
        ending at another side), its advice is another image size, which is not the user's
        remedy here: the latent side the images would have stands in."""
        try:
            grid = tuple(self.grid(spec.resolution))
        except ValueError:
            grid = (spec.resolution / self.downsample,) * 2
        if grid == (spec.grid_h, spec.grid_w):
            return []
        return [f"{grid[0]:g}x{grid[1]:g} codes per {spec.resolution}-px image vs the "
                f"generator's {spec.grid_h}x{spec.grid_w}"]

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
