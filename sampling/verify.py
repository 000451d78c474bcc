"""Acceptance rules of speculative decoding: which drafted tokens a forward pass accepts, what
a rejected slot draws instead, and what the slots that stay drafts become.

Every rule sees, for each slot of the window (B, T): the drafted token x, its draft
distribution q (B, T, V) (the one x was drawn from; one-hot for a fresh draft), the target p
(B, T, V) the model gives the slot in this pass (CFG, temperature, top-k and top-p applied
exactly as plain sampling applies them), a uniform `u` per slot for the test and race noise
(B, T, V) for the draws. The sampler commits the leading run of accepted steps plus the first
rejected one, whose rejected tokens come from `residual`; the slots after it become the next
pass's drafts with q = p.

    sjd      accept x with probability min(1, p(x) / q(x)); a rejected slot draws from the
             normalised residual max(p - q, 0); later slots are redrawn from p (SJD, Teng et
             al. 2024). Lossless.
    coupled  the same test, but every later slot also keeps its draft when its own test passes
             and draws from the residual otherwise: the maximal coupling of q and p, so the new
             draft is distributed as p and equals the old one as often as possible, which keeps
             the Jacobi trajectory stable (SCD / MC-SJD). Lossless: the next pass's q is p, the
             kept draft's distribution (the released code keeps the old q for a kept slot,
             which the losslessness argument does not cover).
    gsd      accept x with probability min(1, sum_G p / sum_G q) over a dynamic group G of
             tokens similar to x: among the 14 tokens at ranks r - ranks .. r + ranks - 1 of
             the target's ascending order around x's rank r (GSD's released window: x, 6 more
             likely, 7 less likely), those with |p(y) - p(x)| < p_threshold and a squared L2
             distance between their input embeddings and x's below d_threshold. Rejections and
             redraws as sjd (GSD, So et al. 2025). Lossy: faster, at a small quality cost.
             The group lies in the filtered support: a draft that top-k / top-p removed
             (p(x) = 0) has none and is rejected, as sjd rejects it, so gsd never emits a
             removed token. GSD's released code does not check this: there such a draft,
             ranked beside kept tokens of small p, joins their group and can be accepted on
             their mass. A kept draft's group is the released one (removed neighbours add q
             mass but no p mass).
"""

from __future__ import annotations

import torch

RULES = ("sjd", "coupled", "gsd")


def race(weights: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw from the unnormalised weights (..., V) with uniform noise (..., V): the exponential
    race of `ar.logits.sample_categorical`."""
    return (weights / -torch.log(noise)).argmax(-1)


def residual(p: torch.Tensor, q: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Draws from norm(max(p - q, 0)), or from p where the residual is empty (p == q up to
    rounding: then the test accepts every draft, so this only guards against rounding)."""
    rest = (p - q).clamp(min=0)
    empty = rest.sum(-1, keepdim=True) <= 1e-12
    return race(torch.where(empty, p, rest), noise)


def picked(dist: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """dist (B, T, V) at the tokens (B, T)."""
    return dist.gather(-1, tokens[..., None])[..., 0]


def grouped_mass(p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, embeddings: torch.Tensor,
                 ranks: int, p_threshold: float, d_threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GSD's group masses (sum_G p, sum_G q), each (B, T): see the module docstring. The window
    is cut at the ends of the vocabulary (the released code's slice comes out empty, and the
    test fails, when x is among the `ranks` least likely tokens); a draft outside the filtered
    support (p(x) = 0) has an empty group, masses 0, which the test rejects."""
    V = p.shape[-1]
    ascending = torch.sort(p, dim=-1, stable=True).indices  # (B, T, V): token at each rank
    rank_of = torch.empty_like(ascending).scatter_(-1, ascending, torch.arange(V, device=p.device)
                                                  .expand_as(ascending))
    r = rank_of.gather(-1, drafts[..., None])  # (B, T, 1)
    at = r + torch.arange(-ranks, ranks, device=p.device)  # (B, T, 2 ranks)
    inside = (at >= 0) & (at < V)
    group = ascending.gather(-1, at.clamp(0, V - 1))  # (B, T, 2 ranks) candidate tokens
    p_x = picked(p, drafts)[..., None]
    e = embeddings.float()
    distance = (e[group] - e[drafts][..., None, :]).square().sum(-1)  # (B, T, 2 ranks)
    keep = inside & ((p.gather(-1, group) - p_x).abs() < p_threshold) & (distance < d_threshold)
    keep &= p_x > 0  # a draft the filter removed has no group (see the module docstring)
    return ((p.gather(-1, group) * keep).sum(-1), (q.gather(-1, group) * keep).sum(-1))


def verify(rule: str, p: torch.Tensor, q: torch.Tensor, drafts: torch.Tensor, u: torch.Tensor,
           noise: torch.Tensor, group=None):
    """(accepted (B, T) bool, the token each slot takes if its step is committed (the draft,
    or a residual draw where rejected), the next draft of each slot that stays uncommitted,
    and that draft's q (B, T, V)). `group`: gsd's grouped_mass arguments (embeddings, ranks,
    p_threshold, d_threshold)."""
    if rule == "gsd":
        mass_p, mass_q = grouped_mass(p, q, drafts, *group)
    else:
        mass_p, mass_q = picked(p, drafts), picked(q, drafts)
    accepted = u * mass_q < mass_p  # u < p/q without dividing (q(x) > 0 for a drawn x)
    committed = torch.where(accepted, drafts, residual(p, q, noise))
    if rule == "coupled":
        return accepted, committed, committed, p  # keep or take the residual, slot by slot
    return accepted, committed, race(p, noise), p
