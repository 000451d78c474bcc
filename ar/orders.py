"""Generation orders: how a (h, w) code grid becomes a sequence of steps.

An order owns
  - the permutation between the row-major grid and the sequence (`perm`, `inv`),
  - the grid coordinates of each sequence element (for 2D RoPE),
  - the steps: step s is the sequence span [starts[s], starts[s + 1]), generated at once,
  - the step id of every element (`step_of`).
Orders are pure index maps on the CPU: no parameters. The attention rule built from the steps
(block-causal, inclusive of the own step when its inputs are known) lives with the inputs
(`ar/inputs.py`), since where a step's inputs sit in the sequence is theirs to say.

    raster        one token per step, row by row (LlamaGen)
    cell k        k x k cells in raster order, raster inside a cell (xAR's next-cell, any k
                  dividing both grid sides; xAR's release fixes k = 8 on 16 x 16)
    subsample s   s x s offsets in raster order; step j is the strided sub-grid of offset j
                  (every s-th row and column): each step spans the whole image
    whole         the whole grid in one step
    scale         a coarse-to-fine pyramid of code maps (VAR's next-scale): step k is the
                  whole pn_k x pn_k map of scale k; the sequence is every scale's codes, the
                  multi-scale tokenizer's own layout, so it is not a permutation of one grid
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import ConfigError

CPU = torch.device("cpu")  # index maps live on the CPU, even when a model is built on meta


@dataclass
class OrderConfig:
    name: str = "raster"  # raster | cell | subsample | whole | scale (the multi-scale tokenizer's schedule, VAR): a name in ORDERS
    cell: int = 2  # cell: k x k tokens per step (k divides both grid sides)
    subsample: int = 2  # subsample: s x s steps, each the sub-grid of one offset

    def validate(self) -> None:
        if self.name not in ORDERS:
            raise ConfigError(f"model.order.name={self.name!r}; choose one of {sorted(ORDERS)}")
        for key in ("cell", "subsample"):
            if getattr(self, key) < 1:
                raise ConfigError(f"model.order.{key}={getattr(self, key)} must be >= 1")


class Order:
    name = "base"
    scales: list[int] | None = None  # the scale order's schedule (pyramid sides); None for one grid

    @classmethod
    def build(cls, cfg: OrderConfig, grid_h: int, grid_w: int, scales: list[int]) -> "Order":
        """The order from its config section (orders with a size read their own key)."""
        return cls(grid_h, grid_w)

    def __init__(self, grid_h: int, grid_w: int):
        self.grid_h, self.grid_w = grid_h, grid_w
        self.num_tokens = self.sequence_length()
        perm, sizes = self.layout()
        if sorted(perm.tolist()) != list(range(self.num_tokens)) or sum(sizes) != self.num_tokens:
            raise ValueError(f"order {self.name} does not give a permutation of the grid")
        self.perm = perm  # (N,): sequence index -> row-major grid index
        self.inv = torch.argsort(perm)  # (N,): row-major grid index -> sequence index
        self.step_sizes = list(sizes)  # tokens of each step
        self.num_steps = len(sizes)
        self.starts = [0]
        for size in sizes:
            self.starts.append(self.starts[-1] + size)
        self.step_of = torch.repeat_interleave(torch.arange(self.num_steps, device=CPU),
                                               torch.tensor(sizes, device=CPU))  # (N,)

    def layout(self) -> tuple[torch.Tensor, list[int]]:
        """(perm (N,), tokens per step)."""
        raise NotImplementedError

    def sequence_length(self) -> int:
        """N: elements of the sequence (the grid's tokens for every order but scale)."""
        return self.grid_h * self.grid_w

    @property
    def group_size(self) -> int:
        """Tokens per step when every step has the same size (all orders here)."""
        if len(set(self.step_sizes)) != 1:
            raise ValueError(f"order {self.name} has steps of different sizes")
        return self.step_sizes[0]

    def span(self, step: int) -> tuple[int, int]:
        return self.starts[step], self.starts[step + 1]

    def to_sequence(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) or (B, h*w) grid codes -> (B, N) sequence; latents (B, C, h, w) ->
        (B, N, C)."""
        if codes.dim() == 4:
            flat = codes.flatten(2).transpose(1, 2)  # (B, N, C) row-major
        else:
            flat = codes.reshape(codes.shape[0], self.num_tokens)  # (B, N) row-major
        return flat[:, self.perm.to(flat.device)]

    def to_grid(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, N) sequence -> (B, h, w) grid codes; (B, N, C) latents -> (B, C, h, w)."""
        flat = seq[:, self.inv.to(seq.device)]  # (B, N) or (B, N, C) row-major
        if seq.dim() == 3:
            return flat.transpose(1, 2).reshape(seq.shape[0], -1, self.grid_h, self.grid_w)
        return flat.reshape(seq.shape[0], self.grid_h, self.grid_w)

    def coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Grid (rows, cols) of each sequence element, each (N,)."""
        return self.perm // self.grid_w, self.perm % self.grid_w

    def above(self) -> torch.Tensor:
        """(N,): for each element, the element of an earlier step that sits one step's height
        above it in the grid (the same place in the step above), or -1 where there is none:
        speculative decoding's spatial initialisation copies it (SJD). None by default."""
        return torch.full((self.num_tokens,), -1, dtype=torch.long, device=CPU)

    def _shifted(self, steps_back: int) -> torch.Tensor:
        """The element at the same index of the step `steps_back` earlier (-1 before step 0)."""
        e = torch.arange(self.num_tokens, device=CPU)
        back = e - steps_back * self.group_size
        return torch.where(self.step_of >= steps_back, back, torch.full_like(e, -1))

    def __repr__(self) -> str:
        return (f"{self.name}({self.grid_h}x{self.grid_w}: {self.num_steps} steps of "
                f"{self.step_sizes[0]})")


class RasterOrder(Order):
    """Row by row, left to right, one token per step: LlamaGen's order."""

    name = "raster"

    def layout(self):
        return torch.arange(self.num_tokens, device=CPU), [1] * self.num_tokens

    def above(self) -> torch.Tensor:
        return self._shifted(self.grid_w)  # the token one row up


def _divides(k: int, grid_h: int, grid_w: int, key: str) -> None:
    if k < 1 or grid_h % k or grid_w % k:
        raise ValueError(f"{key}={k} must divide both sides of the {grid_h}x{grid_w} code grid")


class CellOrder(Order):
    """k x k cells in raster order; inside a cell, raster order (xAR's next-cell)."""

    name = "cell"

    @classmethod
    def build(cls, cfg: OrderConfig, grid_h: int, grid_w: int, scales: list[int]) -> "Order":
        return cls(grid_h, grid_w, cfg.cell)

    def __init__(self, grid_h: int, grid_w: int, cell: int = 2):
        _divides(cell, grid_h, grid_w, "model.order.cell")
        self.k = cell
        super().__init__(grid_h, grid_w)

    def layout(self):
        k, h, w = self.k, self.grid_h, self.grid_w
        grid = torch.arange(self.num_tokens, device=CPU).view(h // k, k, w // k, k)  # (hk, r, wk, c)
        perm = grid.permute(0, 2, 1, 3).reshape(-1)  # cells in raster order, raster inside
        return perm, [k * k] * (self.num_tokens // (k * k))

    def above(self) -> torch.Tensor:
        return self._shifted(self.grid_w // self.k)  # the same place in the cell one row of cells up

    def __repr__(self) -> str:
        return f"cell{self.k}" + super().__repr__()[len(self.name):]


class SubsampleOrder(Order):
    """s x s offsets in raster order; step j is the sub-grid of offset j, every s-th row and
    column, itself in raster order. Each step covers the whole image at 1/s resolution."""

    name = "subsample"

    @classmethod
    def build(cls, cfg: OrderConfig, grid_h: int, grid_w: int, scales: list[int]) -> "Order":
        return cls(grid_h, grid_w, cfg.subsample)

    def __init__(self, grid_h: int, grid_w: int, stride: int = 2):
        _divides(stride, grid_h, grid_w, "model.order.subsample")
        self.s = stride
        super().__init__(grid_h, grid_w)

    def layout(self):
        s, h, w = self.s, self.grid_h, self.grid_w
        grid = torch.arange(self.num_tokens, device=CPU).view(h // s, s, w // s, s)  # (row/s, dr, col/s, dc)
        perm = grid.permute(1, 3, 0, 2).reshape(-1)  # offsets (dr, dc) in raster order, outer
        return perm, [self.num_tokens // (s * s)] * (s * s)

    def above(self) -> torch.Tensor:
        # offset (dr, dc) lies one grid row below offset (dr - 1, dc); offsets of row 0 have none
        return self._shifted(self.s)

    def __repr__(self) -> str:
        return f"subsample{self.s}" + super().__repr__()[len(self.name):]


class WholeOrder(Order):
    """The whole grid in one step (raster order inside it)."""

    name = "whole"

    def layout(self):
        return torch.arange(self.num_tokens, device=CPU), [self.num_tokens]


class ScaleOrder(Order):
    """Every scale's code map, coarse to fine, each row-major: VAR's next-scale. Codes come as
    the multi-scale tokenizer stores them, (B, L) with L = sum of pn_k^2, which is already the
    sequence, so `to_sequence` and `to_grid` keep that layout. Grid coordinates (for RoPE) are
    the cell centres of each scale in the finest grid's units, so that a coarse token sits
    where the fine tokens it summarises do."""

    name = "scale"

    @classmethod
    def build(cls, cfg: OrderConfig, grid_h: int, grid_w: int, scales: list[int]) -> "Order":
        return cls(grid_h, grid_w, scales)

    def __init__(self, grid_h: int, grid_w: int, scales: list[int]):
        scales = list(scales)
        if not scales or grid_h != grid_w or scales[-1] != grid_h \
                or any(a >= b for a, b in zip(scales, scales[1:])) or scales[0] < 1:
            raise ValueError(f"model.order.name=scale needs the scale schedule of a multi-scale "
                             f"tokenizer (increasing sides ending at the {grid_h}x{grid_w} grid); "
                             f"got {scales}: train on a multi-scale (msvq) code cache")
        self.scales = scales
        super().__init__(grid_h, grid_w)

    def sequence_length(self) -> int:
        return sum(p * p for p in self.scales)

    def layout(self):
        return torch.arange(self.num_tokens, device=CPU), [p * p for p in self.scales]

    def to_sequence(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() != 2 or codes.shape[1] != self.num_tokens:
            raise ValueError(f"codes of shape {tuple(codes.shape)}: the scale order over "
                             f"{self.scales} needs every scale's codes, (B, {self.num_tokens}); "
                             f"a single-grid code cache trains the other orders")
        return codes

    def to_grid(self, seq: torch.Tensor) -> torch.Tensor:
        return seq  # (B, L): what the multi-scale tokenizer decodes

    def coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = [], []
        for p in self.scales:
            centre = (torch.arange(p, dtype=torch.float64, device=CPU) + 0.5) * self.grid_h / p - 0.5
            rows.append(centre.repeat_interleave(p))  # (p*p,) row-major
            cols.append(centre.repeat(p))
        return torch.cat(rows), torch.cat(cols)

    def __repr__(self) -> str:
        return f"scale({'-'.join(map(str, self.scales))}: {self.num_steps} steps, {self.num_tokens} tokens)"


ORDERS: dict[str, type[Order]] = {"raster": RasterOrder, "cell": CellOrder,
                                  "subsample": SubsampleOrder, "whole": WholeOrder,
                                  "scale": ScaleOrder}


def make_order(cfg: OrderConfig | str, grid_h: int, grid_w: int, scales: list[int] | None = None) -> Order:
    """An order from its config section (or a registry name with default sizes); the scale
    order's schedule is the tokenizer's."""
    cfg = OrderConfig(cfg) if isinstance(cfg, str) else cfg
    if cfg.name not in ORDERS:
        raise ValueError(f"model.order.name={cfg.name!r}; choose one of {sorted(ORDERS)}")
    return ORDERS[cfg.name].build(cfg, grid_h, grid_w, list(scales or []))
