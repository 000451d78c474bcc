"""A tokenizer's evaluation after training: PSNR of reconstructions, codebook usage (VQ; per
scale for the multi-scale VQ) or the posterior's statistics and the latent scale they suggest
(KL), the reconstruction grid, the reconstruction FID (rFID), and what the summary says of
them. Used by tokenizer/train.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from dataset.images import save_png, to_uint8
from tokenizer.kl_loss import LatentStats
from tokenizer.msvq_train import rounded, usage_per_scale
from tokenizer.quantizer import code_usage


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR in dB of images in [-1, 1], measured on the [0, 1] scale."""
    a, b = (x.clamp(-1, 1) + 1) / 2, (y.clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()


class CodeUsage:
    """Evaluation of a VQ: reconstructions through the codebook, and the codes' histogram
    (one row per scale for the multi-scale VQ)."""

    def __init__(self, raw):
        rows = (len(raw.patch_nums),) if raw.kind == "multiscale" else ()
        self.counts = torch.zeros(rows + (raw.codebook_size,), dtype=torch.long)

    def reconstruct(self, raw, x: torch.Tensor) -> torch.Tensor:
        recon, _, stats = raw(x)
        self.counts += stats["counts"].cpu()
        return recon

    def result(self) -> dict:
        out = {k: v.item() for k, v in code_usage(self.counts).items()}
        if self.counts.dim() == 2:
            out["usage_per_scale"] = usage_per_scale(self.counts).tolist()
        return out


class LatentEval(LatentStats):
    """Evaluation of a KL VAE: images decoded from posterior means, and latent statistics."""

    def reconstruct(self, raw, x: torch.Tensor) -> torch.Tensor:
        mean, logvar = raw.posterior(x)
        self.update(mean, logvar)
        return raw.decode_raw(mean)


@torch.no_grad()
def evaluate(raw, dataset, n: int, device, out_dir: Path, keep_images: bool = False,
             seed: int = 0) -> dict:
    """PSNR and codebook usage (VQ) or latent statistics (KL) on `n` evenly spaced images;
    writes the reconstruction grid. With keep_images, also returns the originals and
    reconstructions as uint8 NHWC (for rFID)."""
    raw.eval()
    idx = np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int)
    loader = DataLoader(torch.utils.data.Subset(dataset, idx.tolist()), batch_size=64)
    total, count, originals, recons = 0.0, 0, [], []
    tracker = LatentEval(seed) if raw.kind == "continuous" else CodeUsage(raw)
    for x, _ in loader:
        x = x.to(device)
        recon = tracker.reconstruct(raw, x)
        if keep_images:
            originals.append(to_uint8(x.cpu()))
            recons.append(to_uint8(recon.cpu()))
        total += psnr(recon, x).item() * len(x)
        count += len(x)
    # the grid spans the whole (class-sorted) dataset, so every class appears
    grid_idx = np.linspace(0, len(dataset) - 1, min(16, len(dataset))).round().astype(int)
    x = torch.stack([dataset[i][0] for i in grid_idx]).to(device)
    grid_recon = raw.reconstruct(x) if raw.kind == "continuous" else raw(x)[0]
    save_grid(x.cpu(), grid_recon.cpu(), out_dir / "recon.png")
    raw.train()
    result = {"psnr": total / count, "images": count, **tracker.result()}
    if keep_images:
        result["originals"], result["recons"] = np.concatenate(originals), np.concatenate(recons)
    return result


def export_config(cfg, ev: dict):
    """The config the weights are exported with: a KL run asked to measure its latent scale
    (model.latent_scale=0) stores 1/std of its posterior samples on the evaluation images."""
    if cfg.model.name == "kl" and cfg.model.latent_scale == 0:
        return dataclasses.replace(cfg.model, latent_scale=round(ev["latent_scale_measured"], 5))
    return cfg.model


def family_summary(cfg, raw, ev: dict, model_cfg) -> dict:
    """The summary.json entries of the tokenizer's family, from its evaluation."""
    t = cfg.train
    if raw.kind == "continuous":
        return {**{k: round(ev[k], 5) for k in ("latent_mean", "latent_std", "latent_sample_std",
                                                "latent_scale_measured")},
                "latent_scale": model_cfg.latent_scale, "latent_channels": raw.latent_channels,
                "kl_weight": t.kl_weight}
    q = raw.quantize
    per_scale = {} if raw.kind != "multiscale" else {
        "patch_nums": list(cfg.model.patch_nums), "usage_per_scale": rounded(ev["usage_per_scale"]),
        "usage_window_per_scale": rounded(q.seen(t.usage_window).float().mean(1))}
    return {"usage_eval": round(ev["usage"], 4), "perplexity_eval": round(ev["perplexity"], 2),
            "usage_window": round(q.window_usage(t.usage_window), 4),
            "codebook_size": cfg.model.codebook_size, **per_scale}


def family_text(raw, ev: dict, summary: dict, t) -> str:
    """The family's part of the final log line."""
    if raw.kind == "continuous":
        return (f"latent std {ev['latent_sample_std']:.4g} (samples), latent_scale "
                f"{summary['latent_scale']}")
    per_scale = f", per scale {summary['usage_per_scale']}" if raw.kind == "multiscale" else ""
    return (f"codebook usage {ev['usage']:.1%} (eval{per_scale}) / {summary['usage_window']:.1%} "
            f"(last {t.usage_window} batches)")


def save_grid(x: torch.Tensor, recon: torch.Tensor, path: Path, cols: int = 8) -> None:
    """Rows alternate: `cols` originals, then their reconstructions beneath them."""
    orig, rec = to_uint8(x), to_uint8(recon)  # (N, H, W, 3)
    rows = []
    for s in range(0, len(orig), cols):
        for part in (orig[s:s + cols], rec[s:s + cols]):
            pad = np.zeros((cols - len(part),) + part.shape[1:], np.uint8)
            rows.append(np.concatenate(list(np.concatenate([part, pad])), axis=1))  # (H, cols*W, 3)
    save_png(np.concatenate(rows, axis=0), path)


def reconstruction_fid(ev: dict, t, device) -> float:
    """FID of the evaluation images' reconstructions against the originals (or t.rfid_ref)."""
    from evaluation import InceptionExtractor, fid_between, score

    net = InceptionExtractor(device=device)
    if t.rfid_ref:  # statistics of the same held-out images, computed once
        return score(ev["recons"], t.rfid_ref, metrics=["fid"], extractor=net,
                     num_expected=0, num_workers=0)["metrics"]["fid"]
    return fid_between(ev["recons"], ev["originals"], progress=True, extractor=net)
