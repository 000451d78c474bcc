"""The KL autoencoder's diagonal Gaussian posterior, its training loss and latent statistics.

Follows LDM's DiagonalGaussianDistribution and KL term (CompVis/latent-diffusion
ldm/modules/distributions/distributions.py, ldm/modules/losses/contperceptual.py), which MAR's
models/vae.py uses unchanged; written anew, torch only (ar/data.py imports it for the latent
stream without pulling in diffusers).

Conventions, as LDM and MAR:
  - the encoder's (quant_conv's) output is the posterior's moments: C channels of mean, then C
    of log-variance; the log-variance is clamped to [-30, 20] when used, never when stored;
  - the KL term is KL(q(z|x) || N(0, I)) summed over the latent elements of an image and averaged
    over the batch, weighted by `train.kl_weight` (LDM's KL autoencoders use 1e-6).
Our reconstruction loss is a per-element mean (as for the VQ), where LDM sums over the pixels of
an image: at 256 px that sum is 3 * 256 * 256 = 196,608 times the mean, so the same kl_weight
weighs the KL term that much more, relative to reconstruction, than in LDM (3,072 times at
32 px). That is the stronger regularisation a small latent space for a generator wants; the
quickstart config measures its choice.
"""

from __future__ import annotations

import numpy as np
import torch

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # LDM's clamp, so exp() neither overflows nor vanishes
_NOISE_TAG = 0x4B4C4E5A  # keeps the posterior-noise seeds apart from other uses of the seed


def split_moments(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2C, h, w) moments -> posterior mean (B, C, h, w) and clamped log-variance."""
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A posterior sample by reparameterisation: mean + std * noise."""
    return mean + torch.exp(0.5 * logvar) * noise


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over an image's latent elements, batch mean."""
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


def step_noise(shape: tuple[int, ...], seed: int, step: int) -> torch.Tensor:
    """Posterior noise for the whole global batch of a training step, float32 on the CPU.

    A pure function of (seed, step), so a resumed run draws the noise an uninterrupted one
    would, and each rank takes its slice of the same tensor whatever the number of ranks.
    """
    key = np.random.SeedSequence([_NOISE_TAG, seed, step]).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed(int(key[0]) << 32 | int(key[1]))
    return torch.randn(shape, generator=generator)


def kl_losses(net, x: torch.Tensor, noise: torch.Tensor, kl_weight: float):
    """One KL-autoencoder forward: (reconstruction, weighted regulariser, scalars to log, latent
    statistics of this batch). `net` is the model or its DDP wrapper; `noise` this rank's slice."""
    recon, mean, logvar = net(x, noise.to(x.device))
    mean, logvar = mean.float(), logvar.float()  # the KL sum in float32 even under autocast
    kl = kl_divergence(mean, logvar)
    scalars = {"loss/kl": kl.detach(), "latent/logvar": logvar.detach().mean()}
    return recon, kl_weight * kl, scalars, batch_latent_stats(mean.detach(), logvar.detach(), noise)


def batch_latent_stats(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> dict:
    """Mean and std of the posterior mean, the std of posterior samples, and the scale 1/std
    that gives the samples unit variance (LDM's scale_by_std), over one batch."""
    z = sample(mean, logvar, noise.to(mean.device))
    std = z.std()
    return {"latent/mean": mean.mean(), "latent/std": mean.std(), "latent/sample_std": std,
            "latent/scale": 1.0 / std.clamp_min(1e-8)}


class LatentStats:
    """Running statistics of posterior means and samples over many images (the evaluation).

    Sums in float64: a few hundred images of 16 x 8 x 8 latents is fine either way, but a whole
    ImageNet pass in float32 would lose the variance to cancellation.
    """

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)  # evaluation noise, reproducible
        self.sums = torch.zeros(5, dtype=torch.float64)  # count, sum m, sum m^2, sum z, sum z^2

    def update(self, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        noise = torch.randn(mean.shape, generator=self.generator).to(mean.device)
        m, z = mean.double(), sample(mean, logvar, noise).double()
        self.sums += torch.stack([torch.tensor(m.numel(), dtype=torch.float64, device=m.device),
                                  m.sum(), m.pow(2).sum(), z.sum(), z.pow(2).sum()]).cpu()

    def result(self) -> dict:
        n, sm, sm2, sz, sz2 = self.sums.tolist()
        var = lambda s, s2: max(0.0, (s2 - s * s / n) / max(1.0, n - 1))  # noqa: E731
        sample_std = var(sz, sz2) ** 0.5
        return {"latent_mean": sm / n, "latent_std": var(sm, sm2) ** 0.5,
                "latent_sample_std": sample_std, "latent_scale_measured": 1.0 / max(sample_std, 1e-8)}
