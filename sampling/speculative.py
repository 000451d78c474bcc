"""Speculative Jacobi decoding over any discrete order: the model drafts a window of future
steps for itself and one forward pass verifies them all against the KV cache.

    prefill(condition rows); draft the first window (random codes, or the token above)
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

from ar.conditioning import ClassCondition
from common.config import check_fields
from sampling import noise
from sampling.generate import extend, generate
from sampling.guidance import step_scales, uses_cfg
from sampling.verify import RULES, verify

SAMPLERS = ("plain", *RULES)
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
    """What a speculative run cost: summed over the images it made."""

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


def plain_passes(model) -> int:
    """Forward passes plain sampling runs per image after the prefill (discrete models): one
    per step, but next-token's first token comes from the prefill itself."""
    return model.order.num_steps - (1 if model.inputs.kind == "next_token" else 0)


def sample_codes(model, cond: ClassCondition, image_ids: torch.Tensor, seed: int, settings,
                 sampler: str = "plain", spec: SpeculativeConfig | None = None,
                 extend_fn=None) -> tuple[torch.Tensor, SpeculativeStats | None]:
    """Codes (or latents) for the conditions with the chosen sampler, and what they cost in
    forward passes (None for continuous models, whose steps integrate many passes)."""
    if sampler != "plain":
        return generate_speculative(model, cond, image_ids, seed, settings, sampler,
                                    spec or SpeculativeConfig(), extend_fn)
    codes = generate(model, cond, image_ids, seed, settings, extend_fn)
    if model.head.continuous:
        return codes, None
    B, passes = len(cond), plain_passes(model)
    return codes, SpeculativeStats(images=B, steps=B * model.order.num_steps,
                                   tokens=B * model.order.num_tokens, passes=B * passes,
                                   batch_passes=passes)


def check_supported(model, sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r}; choose one of {SAMPLERS}")
    if sampler == "plain":
        return
    if model.head.continuous:
        raise ValueError(f"sampler={sampler}: speculative decoding drafts and verifies discrete "
                         f"tokens; this flow model integrates each step's latents, so use "
                         f"sampler=plain")
    if not hasattr(model.inputs, "elements"):
        raise ValueError(f"sampler={sampler}: a {model.inputs.kind} model feeds each step from "
                         f"the whole previous step (next-scale: the previous scales' sum; "
                         f"shuffle: its tokens fused), so a window of drafts cannot be verified "
                         f"in one pass; use sampler=plain")


@torch.no_grad()
def generate_speculative(model, cond: ClassCondition, image_ids: torch.Tensor, seed: int,
                         settings, sampler: str, spec: SpeculativeConfig,
                         extend_fn=None) -> tuple[torch.Tensor, SpeculativeStats]:
    """Code grids (B, h, w) for the conditions (B), drawn with speculative decoding by `sampler`
    (sjd | coupled | gsd), and what it cost."""
    check_supported(model, sampler)
    order, head = model.order, model.head
    device = cond.device
    B, V, G = len(cond), head.vocab_size, order.group_size
    S, N = order.num_steps, order.num_tokens
    W = min(spec.window, S)
    T = W * G
    guided = uses_cfg(settings)
    rows = cond.with_null(model.cond.null) if guided else cond
    copies = len(rows) // B
    extend_fn = extend_fn or extend
    keys = noise.image_keys(seed, image_ids.to(device), noise.STREAM_SPECULATIVE)
    scales = step_scales(settings, S, device) if guided else None  # (S,): as plain sampling's
    step_of = order.step_of.to(device)
    group = None
    if sampler == "gsd":
        group = (model.tok_embeddings.weight, spec.gsd_ranks, spec.gsd_p_threshold, spec.gsd_d_threshold)
    # tokens of every row, committed and drafted, with T spare columns for windows running
    # past the end (their slots are fed the last element's input and never committed)
    seq = torch.zeros(len(rows), N + T, dtype=torch.long, device=device)
    above = F.pad(order.above().to(device), (0, T), value=-1)  # (N + T,)
    slots = torch.arange(T, device=device)
    done = torch.zeros(B, dtype=torch.long, device=device)  # committed steps per row
    passes = torch.zeros(B, dtype=torch.long, device=device)

    model.setup_cache(len(rows))  # kept afterwards; model.clear_cache() frees it
    prefix, vector = model.condition(rows)
    model.prefill(rows)
    ada = model.modulation(rows)
    drafter = _Drafter(spec.init, seq, above, noise.image_keys(seed, image_ids.to(device),
                                                              noise.STREAM_DRAFTS), V, copies, T)
    q = drafter(slots[None].expand(B, -1), torch.ones(B, T, dtype=torch.bool, device=device), passes)
    while bool((done < S).any()):  # one host sync per forward pass
        active = done < S
        elements = done[:, None] * G + slots  # (B, T) the window, possibly past the end
        fed = elements.clamp(max=N - 1)  # what the window's slots feed
        x, pos = model.inputs.elements(model, fed.repeat(copies, 1), seq[:, :N], vector, prefix)
        h = extend_fn(model, x, pos, ada)  # (R, T, D)
        scale = scales[step_of[fed]][..., None] if guided else None  # (B, T, 1)
        p = head.probs(h, scale, settings)  # (B, T, V)
        drafts = seq[:B].gather(1, elements)
        draws = noise.uniform_elements(noise.mix(keys, passes), elements, V + 1)  # (B, T, V + 1)
        accepted, committed, redrawn, q_next = verify(sampler, p, q, drafts, draws[..., V],
                                                      draws[..., :V], group)

        # steps of the window: the leading accepted ones are committed, then the first rejected
        left = (S - done).clamp(max=W)  # (B,) steps the window really holds (0: finished)
        step_ok = accepted.view(B, W, G).all(-1) & (torch.arange(W, device=device) < left[:, None])
        lead = step_ok.long().cumprod(-1).sum(-1)
        advance = torch.where(lead < left, lead + 1, left)  # (B,) steps committed in this pass
        keep = slots[None] < advance[:, None] * G  # (B, T)
        tokens = torch.where(keep, committed, redrawn)
        seq.scatter_(1, elements.repeat(copies, 1), tokens.repeat(copies, 1))

        # move each window past its committed steps: later slots keep their element (and the
        # q the rule gives them), the freed slots at the end get fresh drafts
        source = slots[None] + advance[:, None] * G  # (B, T) the old slot of each new slot
        q = q_next.gather(1, source.clamp(max=T - 1)[..., None].expand(-1, -1, V))
        done = done + advance
        passes = passes + active.long()
        new = source >= T
        q = torch.where(new[..., None], drafter(done[:, None] * G + slots, new, passes), q)
    stats = SpeculativeStats(images=B, steps=B * S, tokens=B * N, passes=int(passes.sum()),
                             batch_passes=int(passes.max()))
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
