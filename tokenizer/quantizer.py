"""The VQ tokenizer's quantiser (tokenizer/vq.py): nearest code on the unit sphere with
straight-through gradients, and the codebook bookkeeping it shares with the multi-scale VQ
(tokenizer/msvq.py): usage over a window of batches, dead-code restarts, usage and perplexity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def code_usage(counts: torch.Tensor) -> dict:
    """Usage (fraction of codes chosen) and perplexity of a (V,) or (rows, V) code histogram."""
    total = counts.reshape(-1, counts.shape[-1]).sum(0)  # (V,)
    p = total.float() / total.sum()
    return {"usage": (total > 0).float().mean(),
            "perplexity": torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())}


class CodeTracker(nn.Module):
    """Codebook usage over a window of batches and dead-code restarts, for a quantiser with an
    `embedding` codebook whose codes are counted in one row or in several (one per scale).

    `last_used[..., k]` is the tracker step at which code k was last chosen (in that row); it is
    a non-persistent buffer (not in the weights) that the training loop feeds with
    `track(counts)`, so usage over the last N batches is the fraction of codes with
    `last_used > step - N`.
    """

    def init_tracking(self, shape: tuple[int, ...]) -> None:
        """shape: (V,) or (rows, V), the shape of the histograms `track` will get."""
        # built on the CPU even under a meta-device build (a generator's frozen copy of a quantiser)
        self.register_buffer("last_used", torch.full(shape, -1, dtype=torch.long, device="cpu"),
                             persistent=False)
        self.register_buffer("track_step", torch.zeros((), dtype=torch.long, device="cpu"), persistent=False)

    @torch.no_grad()
    def track(self, counts: torch.Tensor) -> None:
        """Record one batch's code histogram (already summed over ranks under DDP)."""
        self.track_step += 1
        self.last_used[counts > 0] = self.track_step

    def seen(self, window: int) -> torch.Tensor:
        """(rows, V) bool: codes chosen at least once in the last `window` tracked batches."""
        seen = (self.last_used >= 0) & (self.last_used > self.track_step - window)
        return seen.reshape(-1, self.last_used.shape[-1])

    def window_usage(self, window: int) -> float:
        """Fraction of codes chosen at least once (in any row) in the last `window` batches."""
        return self.seen(window).any(0).float().mean().item()

    def seed_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        """What a restarted code is set to, given the latent it restarts from."""
        return vectors

    @torch.no_grad()
    def restart_dead(self, window: int, z_pool: torch.Tensor, generator=None) -> int:
        """Re-seed codes unused for `window` batches (in every row) with random recent latents.

        A dead code never receives gradient from the codebook loss, so without a restart it
        stays dead; moving it onto a real latent gives it a chance to be chosen again.
        """
        if self.track_step < window:
            return 0
        last = self.last_used.reshape(-1, self.last_used.shape[-1]).amax(0)  # (V,) last use in any row
        dead = (last <= self.track_step - window).nonzero().flatten()
        if len(dead) == 0 or len(z_pool) == 0:
            return 0
        pick = torch.randint(len(z_pool), (len(dead),), generator=generator, device="cpu")
        self.embedding.weight[dead] = self.seed_codes(z_pool[pick.to(z_pool.device)])
        self.last_used[..., dead] = self.track_step  # a grace period before it can die again
        return len(dead)


class VectorQuantizer(CodeTracker):
    """Nearest-code quantiser on the unit sphere, straight-through gradients; usage tracking and
    dead-code restarts from CodeTracker."""

    def __init__(self, n: int, dim: int, beta: float, l2_norm: bool):
        super().__init__()
        self.n, self.dim, self.beta, self.l2_norm = n, dim, beta, l2_norm
        self.embedding = nn.Embedding(n, dim)
        self.init_tracking((n,))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def nearest(self, z_flat: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """(N, D) -> (N,) index of the nearest code by squared euclidean distance."""
        e = self.codebook()
        e2 = e.pow(2).sum(1)[None]  # (1, K)
        out = []
        # rows in chunks: the (N, K) distance matrix of a 16384-code batch would take GBs
        for z in z_flat.split(chunk):
            d = z.pow(2).sum(1, keepdim=True) + e2 - 2 * z @ e.t()  # ||z||^2 + ||e||^2 - 2 z.e
            out.append(d.argmin(dim=1))
        return torch.cat(out)

    def forward(self, z: torch.Tensor):
        # nearest-code search in float32 even under autocast: bf16 distances mis-assign codes
        with torch.autocast(z.device.type, enabled=False):
            return self._quantize(z.float())

    def _quantize(self, z: torch.Tensor):
        B, D, h, w = z.shape
        z = z.permute(0, 2, 3, 1)  # (B, h, w, D)
        if self.l2_norm:
            z = F.normalize(z, p=2, dim=-1)
        idx = self.nearest(z.reshape(-1, D))  # (B*h*w,)
        # F.embedding, not codebook()[idx]: the indexing's backward sums the rows' gradients in a
        # thread-dependent order once a batch has more than ~2k latents (16x16 codes x 16), so
        # training was not bit-reproducible; the embedding's backward is, and on fewer rows it
        # gives the same bits as before
        zq = F.embedding(idx, self.codebook()).view_as(z)
        codebook_loss = F.mse_loss(zq, z.detach())  # pulls codes toward the encoder
        commit_loss = self.beta * F.mse_loss(z, zq.detach())  # keeps the encoder near its code
        zq = z + (zq - z).detach()  # straight-through: the decoder's gradient reaches z
        counts = torch.bincount(idx, minlength=self.n)
        stats = {"counts": counts, **code_usage(counts),
                 "latents": z.detach().reshape(-1, D)}  # candidates for dead-code restarts
        losses = {"codebook": codebook_loss, "commit": commit_loss}
        return zq.permute(0, 3, 1, 2).contiguous(), idx.view(B, h, w), losses, stats

    def seed_codes(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(vectors, dim=-1) if self.l2_norm else vectors
