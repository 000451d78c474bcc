"""Generation orders: how a (h, w) code grid becomes the sequence the transformer models.

An order owns the permutation (grid -> sequence and back), the grid coordinates of each
sequence element (for 2D RoPE) and the attention mask over the sequence. `group_size` is the
number of tokens produced per autoregressive step (1 for raster; >1 for the next-X orders that
later issues add). Orders are pure index maps: no parameters.
"""

from __future__ import annotations

import torch


class Order:
    name = "base"
    group_size = 1  # tokens emitted per autoregressive step

    def __init__(self, grid_h: int, grid_w: int):
        self.grid_h, self.grid_w = grid_h, grid_w
        self.num_tokens = grid_h * grid_w
        perm = self.permutation()
        if sorted(perm.tolist()) != list(range(self.num_tokens)):
            raise ValueError(f"order {self.name} does not give a permutation of the grid")
        self.perm = perm  # (N,): sequence index -> row-major grid index
        self.inv = torch.argsort(perm)  # (N,): row-major grid index -> sequence index

    def permutation(self) -> torch.Tensor:
        raise NotImplementedError

    def to_sequence(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) or (B, h*w) grid codes -> (B, N) sequence."""
        flat = codes.reshape(codes.shape[0], self.num_tokens)  # (B, N) row-major
        return flat[:, self.perm.to(flat.device)]

    def to_grid(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, N) sequence -> (B, h, w) grid codes."""
        flat = seq[:, self.inv.to(seq.device)]  # (B, N) row-major
        return flat.reshape(seq.shape[0], self.grid_h, self.grid_w)

    def coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid (rows, cols) of each sequence element, each (N,)."""
        return self.perm // self.grid_w, self.perm % self.grid_w

    def attention_mask(self, prefix: int) -> torch.Tensor | None:
        """Boolean "may attend" mask over [prefix conditions + sequence], or None when plain
        causal attention is right (the fast SDPA path)."""
        return None


class RasterOrder(Order):
    """Row by row, left to right: LlamaGen's order."""

    name = "raster"

    def permutation(self) -> torch.Tensor:
        return torch.arange(self.num_tokens, device="cpu")  # index maps live on the CPU


ORDERS: dict[str, type[Order]] = {"raster": RasterOrder}
