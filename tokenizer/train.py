"""Train a VQ image tokenizer.

    python -m tokenizer.train --config configs/tokenizer/quickstart.yaml [key=value ...]
    torchrun --nproc_per_node=N -m tokenizer.train --config ... (DDP; global batch split over ranks)

Re-running the same command resumes from OUT_DIR/checkpoint.pt (tokenizer/resume.py). At the end it exports
OUT_DIR/vq.safetensors (+ .yaml), OUT_DIR/summary.json and OUT_DIR/recon.png (originals above
their reconstructions). Losses: l2 (+ optional l1) reconstruction, codebook and commitment
losses, and optionally a PatchGAN hinge loss with VQGAN's adaptive weight.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from common.config import ConfigError, check_fields, check_paths, parse_cli, run_cli, to_yaml
from common.dist import all_reduce_mean, all_reduce_sum, barrier, cleanup, get_logger, init_distributed
from common.io import atomic_write_text
from dataset.folder import ClassFolderDataset
from dataset.images import save_png, to_uint8
from tokenizer import build_tokenizer, save_tokenizer
from tokenizer.discriminator import PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss
from tokenizer.resume import disk_full_advice, load_checkpoint, run_identity, save_checkpoint
from tokenizer.vq import VQConfig


@dataclass
class DataConfig:
    root: str = "???"  # class-folder dataset root (root/<class>/<images>)
    resolution: int = 256  # training images are center-cropped to this side
    eval_root: str = ""  # images for the final PSNR/usage and grid; empty: use data.root
    in_memory: bool = False  # decode every image once into RAM (small datasets: much faster on CPU)

    def validate(self) -> None:
        check_fields(self, "data.", {"resolution": ">= 1"})


@dataclass
class TrainConfig:
    batch_size: int = 128  # global batch, split evenly over ranks
    steps: int = 100000  # optimizer steps in total
    lr: float = 1e-4  # peak AdamW learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    weight_decay: float = 0.05  # AdamW weight decay
    warmup: int = 0  # linear learning-rate warm-up steps
    schedule: str = "constant"  # after warm-up: "constant" or "cosine" (decays to 10% of lr)
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    l1_weight: float = 0.0  # weight of an extra L1 reconstruction loss (L2 always has weight 1)
    codebook_weight: float = 1.0  # weight of codebook + commitment losses
    restart_dead: int = 0  # re-seed codes unused for this many batches from encoder outputs; 0: off
    usage_window: int = 100  # batches over which codebook usage is reported
    gan: bool = False  # add the PatchGAN adversarial loss
    disc_start: int = 20000  # step at which the GAN loss (and discriminator training) starts
    disc_weight: float = 0.5  # GAN loss weight, times the adaptive weight
    disc_layers: int = 3  # PatchGAN stride-2 layers
    disc_ch: int = 64  # PatchGAN base channels
    eval_images: int = 512  # images for the final PSNR / usage evaluation
    rfid: bool = False  # also report rFID: the eval images' reconstructions vs the originals (needs `make inception`)
    rfid_ref: str = ""  # reference .npz of those originals (eval_fid.py mode=ref) to reuse; empty: an extra Inception pass
    seed: int = 0  # seeds init and the data order (a function of seed and step)
    num_workers: int = 2  # DataLoader workers (unused with data.in_memory)
    log_every: int = 50  # steps between logged scalars
    ckpt_every: int = 1000  # steps between resume checkpoints
    device: str = "auto"  # "auto", "cpu" or "cuda"
    precision: str = "fp32"  # "fp32", or "bf16" autocast (GPU; the quantiser stays float32)

    def validate(self) -> None:
        check_fields(self, "train.", {
            "batch_size": ">= 1", "steps": ">= 1", "lr": "> 0", "weight_decay": ">= 0",
            "warmup": ">= 0", "schedule": ("constant", "cosine"), "grad_clip": ">= 0",
            "l1_weight": ">= 0", "codebook_weight": ">= 0", "restart_dead": ">= 0",
            "usage_window": ">= 1", "disc_start": ">= 0", "disc_weight": ">= 0",
            "disc_layers": ">= 1", "disc_ch": ">= 1", "eval_images": ">= 1", "num_workers": ">= 0",
            "log_every": ">= 1", "ckpt_every": ">= 1", "device": ("auto", "cpu", "cuda"),
            "precision": ("fp32", "bf16")})
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas={self.betas} is out of range; it must be two numbers in [0, 1)")


@dataclass
class TokenizerTrainConfig:
    data: DataConfig = field(default_factory=DataConfig)  # training images
    model: VQConfig = field(default_factory=VQConfig)  # tokenizer architecture
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation
    out_dir: str = "runs/tokenizer"  # run directory: checkpoint, weights, logs, summary


# ---------------------------------------------------------------- data

def global_batch(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Dataset indices of the global batch at `step`: epochs of seeded permutations.

    A pure function of (seed, step), so a resumed run sees exactly the batches it would have.
    """
    pos = torch.arange(step * batch, (step + 1) * batch)
    epochs, offsets = pos // n, pos % n
    out = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        out[sel] = _epoch_perm(n, seed, e)[offsets[sel]]
    return out


@functools.lru_cache(maxsize=2)
def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    # cached: a batch needs at most two epochs' orders, and re-drawing 1.3M items per step is slow
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class StepBatches(Sampler):
    """This rank's share of each global batch, for steps [start, stop)."""

    def __init__(self, n, batch, seed, start, stop, rank, world):
        self.args = (n, batch, seed)
        self.start, self.stop, self.rank, self.per_rank = start, stop, rank, batch // world

    def __len__(self):
        return max(0, self.stop - self.start)

    def __iter__(self):
        for step in range(self.start, self.stop):
            idx = global_batch(*self.args, step)
            yield idx[self.rank * self.per_rank:(self.rank + 1) * self.per_rank].tolist()


def load_all(dataset, num_workers: int) -> torch.Tensor:
    """Every image of a (small) dataset as one (N, 3, R, R) tensor."""
    loader = DataLoader(dataset, batch_size=256, num_workers=num_workers)
    return torch.cat([x for x, _ in loader])


def batches(cfg, dataset, images, start, info):
    sampler = StepBatches(len(dataset), cfg.train.batch_size, cfg.train.seed, start,
                          cfg.train.steps, info.rank, info.world_size)
    if images is not None:
        return (images[i] for i in sampler)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.train.num_workers,
                        pin_memory=info.device.type == "cuda", persistent_workers=False)
    return (x for x, _ in loader)


# ---------------------------------------------------------------- training pieces

def lr_at(t: TrainConfig, step: int) -> float:
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    if t.schedule == "cosine":
        frac = (step - t.warmup) / max(1, t.steps - t.warmup)
        return t.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
    return t.lr


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR in dB of images in [-1, 1], measured on the [0, 1] scale."""
    a, b = (x.clamp(-1, 1) + 1) / 2, (y.clamp(-1, 1) + 1) / 2
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1.0 / mse)).mean()


def make_optimizer(params, t: TrainConfig):
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)


def generator_step(cfg, vq, disc, opt, x, step):
    """One tokenizer update; returns (recon, scalars, quantiser stats).

    `disc` is the unwrapped discriminator: the GAN loss only needs its gradient with respect
    to the image, and the stray grads it leaves on D are cleared before D's own step.
    """
    t = cfg.train
    raw = vq.module if isinstance(vq, DDP) else vq
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
        recon, qlosses, stats = vq(x)
    recon = recon.float()
    rec = F.mse_loss(recon, x) + (t.l1_weight * F.l1_loss(recon, x) if t.l1_weight else 0.0)
    loss = rec + t.codebook_weight * (qlosses["codebook"] + qlosses["commit"])
    scalars = {"loss/rec": rec.detach(), "loss/codebook": qlosses["codebook"].detach(),
               "loss/commit": qlosses["commit"].detach()}
    if t.gan and step >= t.disc_start:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
            g = generator_loss(disc(recon).float())
        w = t.disc_weight * adaptive_weight(rec, g, raw.decoder.last_layer)
        loss = loss + w * g
        scalars.update({"loss/gen": g.detach(), "gan/weight": w})
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if t.grad_clip > 0:
        scalars["grad_norm"] = torch.nn.utils.clip_grad_norm_(raw.parameters(), t.grad_clip)
    opt.step()
    scalars["loss/total"] = loss.detach()
    return recon.detach(), scalars, stats


def disc_step(disc, opt, x, recon):
    # one forward over real and fake together: DDP expects one forward per backward
    logits = disc(torch.cat([x, recon]))
    logits_real, logits_fake = logits.chunk(2)
    loss = hinge_d_loss(logits_real, logits_fake)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return {"loss/disc": loss.detach(), "disc/logits_real": logits_real.detach().mean(),
            "disc/logits_fake": logits_fake.detach().mean()}


def track_codes(raw, stats, t: TrainConfig, step: int) -> int:
    """Update usage statistics with the global code histogram; restart dead codes if asked."""
    q = raw.quantize
    q.track(all_reduce_sum(stats["counts"]))
    if not t.restart_dead:
        return 0
    # seeded by step, so a resumed run re-seeds dead codes exactly as an uninterrupted one
    generator = torch.Generator().manual_seed(t.seed * 1_000_003 + step)
    restarted = q.restart_dead(t.restart_dead, stats["latents"], generator)
    if restarted and dist.is_initialized():  # every rank must hold rank 0's codebook
        dist.broadcast(q.embedding.weight.data, src=0)
    return restarted


# ---------------------------------------------------------------- outputs

@torch.no_grad()
def evaluate(raw, dataset, n: int, device, out_dir: Path, keep_images: bool = False) -> dict:
    """PSNR and codebook usage on `n` evenly spaced images; writes the reconstruction grid.
    With keep_images, also returns the originals and reconstructions as uint8 NHWC (for rFID)."""
    raw.eval()
    idx = np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int)
    loader = DataLoader(torch.utils.data.Subset(dataset, idx.tolist()), batch_size=64)
    total, count, counts = 0.0, 0, torch.zeros(raw.codebook_size, dtype=torch.long)
    originals, recons = [], []
    for x, _ in loader:
        x = x.to(device)
        recon, _, stats = raw(x)
        if keep_images:
            originals.append(to_uint8(x.cpu()))
            recons.append(to_uint8(recon.cpu()))
        total += psnr(recon, x).item() * len(x)
        count += len(x)
        counts += stats["counts"].cpu()
    # the grid spans the whole (class-sorted) dataset, so every class appears
    grid_idx = np.linspace(0, len(dataset) - 1, min(16, len(dataset))).round().astype(int)
    x = torch.stack([dataset[i][0] for i in grid_idx]).to(device)
    save_grid(x.cpu(), raw(x)[0].cpu(), out_dir / "recon.png")
    raw.train()
    p = counts.float() / counts.sum()
    result = {"psnr": total / count, "usage": (counts > 0).float().mean().item(),
              "perplexity": math.exp(-(p * p.clamp_min(1e-10).log()).sum().item()), "images": count}
    if keep_images:
        result["originals"], result["recons"] = np.concatenate(originals), np.concatenate(recons)
    return result


def save_grid(x: torch.Tensor, recon: torch.Tensor, path: Path, cols: int = 8) -> None:
    """Rows alternate: `cols` originals, then their reconstructions beneath them."""
    orig, rec = to_uint8(x), to_uint8(recon)  # (N, H, W, 3)
    rows = []
    for s in range(0, len(orig), cols):
        for part in (orig[s:s + cols], rec[s:s + cols]):
            pad = np.zeros((cols - len(part),) + part.shape[1:], np.uint8)
            rows.append(np.concatenate(list(np.concatenate([part, pad])), axis=1))  # (H, cols*W, 3)
    save_png(np.concatenate(rows, axis=0), path)


# ---------------------------------------------------------------- main

def main(argv=None) -> dict:
    return run(parse_cli(TokenizerTrainConfig, argv, __doc__))


def run(cfg: TokenizerTrainConfig) -> dict:
    check_paths(cfg, {"data.root": "point it at a class-folder dataset (root/<class>/<images>)",
                      "data.eval_root": "point it at held-out class folders, or leave it empty",
                      "train.rfid_ref": f"build it with `python eval_fid.py mode=ref images=HELDOUT "
                                        f"out={cfg.train.rfid_ref}`"})
    t = cfg.train
    info = init_distributed(t.device)
    log = get_logger("tokenizer.train", info.rank)
    if t.batch_size % info.world_size:
        raise SystemExit(f"error: train.batch_size={t.batch_size} is not divisible by the "
                         f"{info.world_size} processes")
    out = Path(cfg.out_dir)
    if info.is_main:
        if t.rfid:  # fail now, not after training, when the Inception weights are missing
            from evaluation.weights import resolve_weights

            resolve_weights()
    torch.manual_seed(t.seed)  # same init on every rank
    dataset = ClassFolderDataset(cfg.data.root, cfg.data.resolution)
    log.info(f"{dataset}; tokenizer grid {cfg.data.resolution // 2 ** (len(cfg.model.ch_mult) - 1)}^2")

    identity = run_identity(cfg, dataset)
    raw, disc, opt, opt_d, start = build(cfg, info, log, identity)  # refuses other settings
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml", to_yaml(cfg))
    if start >= t.steps and (out / "summary.json").is_file() and (out / "vq.safetensors").is_file():
        log.info(f"{out} already holds the finished run; nothing to do")
        cleanup()
        return json.loads((out / "summary.json").read_text())
    torch.manual_seed(t.seed * 7919 + start * 31 + info.rank)  # dropout noise differs per rank
    vq, d_net = raw, disc
    if info.world_size > 1:  # usage buffers are synced by hand (track_codes), not broadcast
        vq = DDP(raw, **_no_buffer_sync())
        d_net = DDP(disc) if disc is not None else None
    images = load_all(dataset, t.num_workers) if cfg.data.in_memory else None
    writer = make_writer(out) if info.is_main else None

    t0, restarted, ckpt_path, saved = time.time(), 0, out / "checkpoint.pt", start
    bar = tqdm(total=t.steps, initial=start, disable=not info.is_main, desc="vq", dynamic_ncols=True)
    for step, x in enumerate(batches(cfg, dataset, images, start, info), start=start):
        x = x.to(info.device, non_blocking=True)
        for group in opt.param_groups + (opt_d.param_groups if opt_d else []):
            group["lr"] = lr_at(t, step)
        recon, scalars, stats = generator_step(cfg, vq, disc, opt, x, step)
        if disc is not None and step >= t.disc_start:
            scalars.update(disc_step(d_net, opt_d, x, recon))
        restarted += track_codes(raw, stats, t, step)
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            scalars.update({"psnr": psnr(recon, x), "usage/batch": stats["usage"],
                            "usage/restarted": restarted,
                            "usage/perplexity": stats["perplexity"], "lr": lr_at(t, step)})
            log_scalars(writer, bar, scalars, raw.quantize.window_usage(t.usage_window), step + 1)
            restarted = 0
        bar.update(1)
        if (step + 1) % t.ckpt_every == 0 and step + 1 < t.steps:
            if info.is_main:
                with disk_full_advice(saved):
                    save_checkpoint(ckpt_path, raw, disc, opt, opt_d, step + 1, identity)
            saved = step + 1
            barrier()
    bar.close()
    with disk_full_advice(saved):
        return finish(cfg, raw, disc, opt, opt_d, info, log, writer, time.time() - t0, start, identity)


def _no_buffer_sync() -> dict:
    # newer torch renamed broadcast_buffers (and warns about the old name)
    new = "forward_sync_buffers" in inspect.signature(DDP).parameters
    return {"forward_sync_buffers" if new else "broadcast_buffers": False}


def build(cfg, info, log, identity):
    """Tokenizer, optional discriminator, their optimizers; resumed from the checkpoint if any."""
    t = cfg.train
    raw = build_tokenizer(cfg.model).to(info.device)
    disc = PatchDiscriminator(ch=t.disc_ch, n_layers=t.disc_layers).to(info.device) if t.gan else None
    opt = make_optimizer(raw.parameters(), t)
    opt_d = make_optimizer(disc.parameters(), t) if disc is not None else None
    ckpt_path, start = Path(cfg.out_dir) / "checkpoint.pt", 0
    if ckpt_path.is_file():
        start = load_checkpoint(ckpt_path, raw, disc, opt, opt_d, identity)
        log.info(f"resumed from {ckpt_path} at step {start}")
    return raw, disc, opt, opt_d, start


def make_writer(out: Path):
    from torch.utils.tensorboard import SummaryWriter  # imported late: slow import

    return SummaryWriter(str(out))


def log_scalars(writer, bar, scalars, window_usage, step) -> None:
    vals = {k: float(all_reduce_mean(torch.as_tensor(v, dtype=torch.float32))) for k, v in scalars.items()}
    vals["usage/window"] = window_usage
    if writer is not None:
        for k, v in vals.items():
            writer.add_scalar(k, v, step)
    bar.set_postfix(loss=f"{vals['loss/total']:.4f}", psnr=f"{vals['psnr']:.1f}",
                    usage=f"{window_usage:.2f}")


def finish(cfg, raw, disc, opt, opt_d, info, log, writer, seconds, start, identity) -> dict:
    out, t = Path(cfg.out_dir), cfg.train
    summary = {}
    if info.is_main:
        save_checkpoint(out / "checkpoint.pt", raw, disc, opt, opt_d, t.steps, identity)
        save_tokenizer(raw, cfg.model, out / "vq.safetensors")
        eval_set = ClassFolderDataset(cfg.data.eval_root or cfg.data.root, cfg.data.resolution)
        ev = evaluate(raw, eval_set, t.eval_images, info.device, out, keep_images=t.rfid)
        if t.rfid:
            from evaluation import InceptionExtractor, fid_between, score

            net = InceptionExtractor(device=info.device)
            if t.rfid_ref:  # statistics of the same held-out images, computed once
                ev["rfid"] = score(ev["recons"], t.rfid_ref, metrics=["fid"], extractor=net,
                                   num_expected=0, num_workers=0)["metrics"]["fid"]
            else:
                ev["rfid"] = fid_between(ev["recons"], ev["originals"], progress=True, extractor=net)
        summary = {"psnr": round(ev["psnr"], 3), "usage_eval": round(ev["usage"], 4),
                   **({"rfid": round(ev["rfid"], 3)} if t.rfid else {}),
                   "perplexity_eval": round(ev["perplexity"], 2), "eval_images": ev["images"],
                   "usage_window": round(raw.quantize.window_usage(t.usage_window), 4),
                   "codebook_size": cfg.model.codebook_size, "steps": t.steps,
                   "steps_this_run": t.steps - start, "batch_size": t.batch_size,
                   "wall_time_s": round(seconds, 1), "world_size": info.world_size,
                   "weights": str((out / "vq.safetensors").resolve())}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
        if writer is not None:
            writer.add_scalar("eval/psnr", ev["psnr"], t.steps)
            writer.close()
        rfid = f", rFID {ev['rfid']:.2f}" if t.rfid else ""
        log.info(f"done: {t.steps} steps in {seconds:.0f}s, PSNR {ev['psnr']:.2f} dB{rfid}, codebook "
                 f"usage {ev['usage']:.1%} (eval) / {summary['usage_window']:.1%} (last "
                 f"{t.usage_window} batches) -> {out / 'vq.safetensors'}")
    barrier()
    cleanup()
    return summary


if __name__ == "__main__":
    run_cli(run, TokenizerTrainConfig, __doc__)
