"""Speculative Jacobi decoding over any discrete order: the model drafts a window of future
steps for itself and one forward pass verifies them all against the KV cache.

    draft the first window (random codes, or the token above)
    repeat until every row has all its steps:
        feed the inputs that predict the window's W steps of each row (one `model.extend`,
        each row at its own positions), giving the target p of every slot
        the rule (`sampling/verify.py`) accepts a leading run of drafted steps; the first
        rejected step is committed too, its rejected tokens drawn from the residual
        the slots after it become the next drafts (q = p); new slots at the window's end
        are initialised; the row's window moves past its committed steps

A step's tokens are independent given the steps before it (the head draws them so), so a
step of a cell order is accepted when all its tokens are, and a rejected token is redrawn
alone. The KV entries a rejected draft wrote are overwritten when its position is fed again,
and masked until then (they sit at later positions): nothing is copied. Every row advances on
its own: a row's window, noise and output depend only on its own history, so a batch is never
held to its slowest row (finished rows idle until the last one ends), and an image is the same
in any batch (tested).

Noise for row i's k-th pass comes from the key (seed, image i, k), per element of the window:
one uniform for the test and V for the draws. Drafts begin as random codes or the token above
(SJD's spatial initialisation) with a one-hot q, which keeps the test exact: a fixed draft x
with q = one-hot(x) is accepted with probability p(x), and otherwise p without x is drawn.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from common.config import check_fields
from sampling import noise
from sampling.context import SamplingContext
from sampling.verify import verify

INITS = ("random", "above")


@dataclass
class SpeculativeConfig:
    window: int = 16  # steps drafted and verified per forward pass (SJD's and GSD's 16)
    init: str = "random"  # new drafts: random (uniform codes: SJD's and GSD's default) | above (the token one step-row up: SJD's spatial init)
    gsd_ranks: int = 7  # gsd: the group's candidates are the 2 x this tokens at ranks r - 7 .. r + 6 around the draft's rank r (GSD's)
    gsd_p_threshold: float = 0.15  # gsd: a candidate y joins if |p(y) - p(x)| < this (GSD's)
    gsd_d_threshold: float = 0.5  # gsd: ... and its input embedding is within this squared L2 distance of x's (GSD's)

    def validate(self) -> None:
        check_fields(self, "speculative.", {"window": ">= 1", "init": INITS, "gsd_ranks": ">= 1",
                                            "gsd_p_threshold": "> 0", "gsd_d_threshold": "> 0"})


@dataclass
class SpeculativeStats:
    """What a run cost: summed over the images it made."""

    images: int = 0
    steps: int = 0  # steps of the order generated (plain sampling makes one per forward pass)
    tokens: int = 0  # tokens generated
    passes: int = 0  # forward passes each image needed, summed (its window's verifications)
    batch_passes: int = 0  # forward passes run (a batch runs until its slowest row is done)

    def add(self, other: "SpeculativeStats | None") -> None:
        """Sum in another run's costs (None: a continuous model's, which are not counted)."""
        if other is None:
            return
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def summary(self) -> dict:
        """Per image: forward passes, and tokens committed per pass (the mean accepted length,
        the resampled token included)."""
        images = max(self.images, 1)
        return {"images": self.images, "forward_passes_per_image": round(self.passes / images, 3),
                "batch_forward_passes": self.batch_passes,
                "steps_per_image": round(self.steps / images, 3),
                "mean_accepted_length": round(self.tokens / max(self.passes, 1), 3)}


class _Window:
    """Every row's window of T = W x G slots over its sequence, and the bookkeeping of a pass."""

    def __init__(self, ctx: SamplingContext, spec: SpeculativeConfig):
        order, device = ctx.model.order, ctx.device
        self.B, self.G = len(ctx.cond), order.group_size
        self.S, self.N = order.num_steps, order.num_tokens
        self.W = min(spec.window, self.S)
        self.T = self.W * self.G
        self.slots = torch.arange(self.T, device=device)
        self.done = torch.zeros(self.B, dtype=torch.long, device=device)  # committed steps per row
        self.passes = torch.zeros(self.B, dtype=torch.long, device=device)

    def elements(self) -> torch.Tensor:
        """(B, T) the window's sequence elements, possibly past the end."""
        return self.done[:, None] * self.G + self.slots

    def advance(self, accepted: torch.Tensor) -> torch.Tensor:
        """(B,) steps committed in this pass: the leading accepted steps, then the first
        rejected one (0 for finished rows)."""
        B, W, G = self.B, self.W, self.G
        left = (self.S - self.done).clamp(max=W)  # (B,) steps the window really holds
        step_ok = accepted.view(B, W, G).all(-1) & (torch.arange(W, device=left.device) < left[:, None])
        lead = step_ok.long().cumprod(-1).sum(-1)
        return torch.where(lead < left, lead + 1, left)


@torch.no_grad()
def speculative_loop(ctx: SamplingContext, rule: str) -> tuple[torch.Tensor, SpeculativeStats]:
    """Code grids (B, h, w) drawn with speculative decoding by `rule` (sjd | coupled | gsd,
    sampling/verify.py), and what it cost."""
    model, spec = ctx.model, ctx.options or SpeculativeConfig()
    order, head, V = model.order, model.head, model.head.vocab_size
    win = _Window(ctx, spec)
    B, T, N, copies = win.B, win.T, win.N, ctx.copies
    keys = ctx.keys(noise.STREAM_SPECULATIVE)
    scales, step_of = ctx.scales(), order.step_of.to(ctx.device)  # (S,): as plain sampling's
    group = None
    if rule == "gsd":
        group = (model.tok_embeddings.weight, spec.gsd_ranks, spec.gsd_p_threshold, spec.gsd_d_threshold)
    # tokens of every row, committed and drafted, with T spare columns for windows running
    # past the end (their slots are fed the last element's input and never committed)
    seq = torch.zeros(len(ctx.rows), N + T, dtype=torch.long, device=ctx.device)
    above = F.pad(order.above().to(ctx.device), (0, T), value=-1)  # (N + T,)
    drafter = _Drafter(spec.init, seq, above, ctx.keys(noise.STREAM_DRAFTS), V, copies, T)
    q = drafter(win.slots[None].expand(B, -1), torch.ones(B, T, dtype=torch.bool, device=ctx.device), win.passes)
    while bool((win.done < win.S).any()):  # one host sync per forward pass
        active = win.done < win.S
        elements = win.elements()  # (B, T)
        fed = elements.clamp(max=N - 1)  # what the window's slots feed
        x, pos = model.inputs.elements(model, fed.repeat(copies, 1), seq[:, :N], ctx.vector, ctx.prefix)
        h = ctx.extend_fn(model, x, pos, ctx.ada)  # (R, T, D)
        scale = scales[step_of[fed]][..., None] if scales is not None else None  # (B, T, 1)
        p = head.probs(h, scale, ctx.settings)  # (B, T, V)
        drafts = seq[:B].gather(1, elements)
        draws = noise.uniform_elements(noise.mix(keys, win.passes), elements, V + 1)  # (B, T, V + 1)
        accepted, committed, redrawn, q_next = verify(rule, p, q, drafts, draws[..., V],
                                                      draws[..., :V], group)
        advance = win.advance(accepted)
        keep = win.slots[None] < advance[:, None] * win.G  # (B, T)
        tokens = torch.where(keep, committed, redrawn)
        seq.scatter_(1, elements.repeat(copies, 1), tokens.repeat(copies, 1))
        # move each window past its committed steps: later slots keep their element (and the
        # q the rule gives them), the freed slots at the end get fresh drafts
        source = win.slots[None] + advance[:, None] * win.G  # (B, T) the old slot of each new slot
        q = q_next.gather(1, source.clamp(max=T - 1)[..., None].expand(-1, -1, V))
        win.done = win.done + advance
        win.passes = win.passes + active.long()
        new = source >= T
        q = torch.where(new[..., None], drafter(win.elements(), new, win.passes), q)
    stats = SpeculativeStats(images=B, steps=B * win.S, tokens=B * N, passes=int(win.passes.sum()),
                             batch_passes=int(win.passes.max()))
    return order.to_grid(seq[:B, :N]), stats


class _Drafter:
    """Fresh drafts for new window slots, written into the rows' sequences; returns their
    one-hot q. random: a uniform code keyed by (image, pass, element); above: the token at
    `order.above()` (committed, or drafted earlier in the window), random where there is none."""

    def __init__(self, init: str, seq: torch.Tensor, above: torch.Tensor,
                 keys: torch.Tensor, vocab: int, copies: int, width: int):
        self.init, self.seq, self.above, self.keys = init, seq, above, keys
        self.vocab, self.copies = vocab, copies
        # a slot's source can be another new slot: copy in rounds, nearest first
        back = torch.arange(len(above), device=above.device) - above
        gap = int(back[above >= 0].min()) if bool((above >= 0).any()) else width
        self.rounds = -(-width // gap)

    def __call__(self, elements: torch.Tensor, new: torch.Tensor, passes: torch.Tensor) -> torch.Tensor:
        B = len(self.keys)
        u = noise.uniform_elements(noise.mix(self.keys, passes), elements, 1)[..., 0]  # (B, T)
        tokens = (u * self.vocab).long().clamp(max=self.vocab - 1)
        self._write(elements, new, tokens)
        if self.init == "above":
            source = self.above[elements]
            for _ in range(self.rounds):
                copied = self.seq[:B].gather(1, source.clamp(min=0))
                tokens = torch.where(source >= 0, copied, tokens)
                self._write(elements, new, tokens)
        return F.one_hot(tokens, self.vocab).float()

    def _write(self, elements: torch.Tensor, new: torch.Tensor, tokens: torch.Tensor) -> None:
        B = len(self.keys)
        values = torch.where(new, tokens, self.seq[:B].gather(1, elements))
        self.seq.scatter_(1, elements.repeat(self.copies, 1), values.repeat(self.copies, 1))
