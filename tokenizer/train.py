"""Train an image tokenizer: VQ (discrete codes), KL (a continuous VAE) or VAR's multi-scale
residual VQ (msvq: one code map per scale of model.patch_nums), picked by model.name.

    python -m tokenizer.train --config configs/tokenizer/quickstart.yaml [key=value ...]
    python -m tokenizer.train --config configs/tokenizer/kl_quickstart.yaml [key=value ...]
    python -m tokenizer.train --config configs/tokenizer/msvq_quickstart.yaml [key=value ...]
    torchrun --nproc_per_node=N -m tokenizer.train --config ... (DDP; global batch split over ranks)
    python -m tokenizer.train model.name=kl --help     (the KL model keys; msvq likewise)

Re-running the same command resumes from OUT_DIR/checkpoint.pt (tokenizer/resume.py). At the end
it exports OUT_DIR/{vq,kl,msvq}.safetensors (+ .yaml), OUT_DIR/summary.json and OUT_DIR/recon.png
(originals above their reconstructions). Losses: l2 (+ optional l1) reconstruction; for the VQs
codebook and commitment losses (msvq: VAR's, averaged over the scales; usage is logged per
scale), for the KL kl_weight * KL (tokenizer/kl_loss.py); optionally a PatchGAN hinge loss
with VQGAN's adaptive weight. A KL run logs the posterior's statistics and
the latent scale 1/std they suggest; with model.latent_scale=0 the exported config stores the
scale measured on the evaluation images at the end (LDM's scale_by_std, MAR's 0.2325).
The settings are tokenizer/train_config.py; the learning-rate schedule is the generator's
(common/schedule.py), and so are the DDP wrapping and the per-rank seed rule (common/dist.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common.config import ConfigError, check_paths, parse_cli, run_cli, to_yaml
from common.dist import (all_reduce_mean, all_reduce_sum, barrier, cleanup, get_logger,
                         init_distributed, rank_seed, wrap_ddp)
from common.io import atomic_write_text, make_folder
from common.schedule import lr_at
from dataset.folder import ClassFolderDataset
from tokenizer import build_tokenizer, save_tokenizer
from tokenizer.batches import batches, load_all
from tokenizer.discriminator import PatchDiscriminator, adaptive_weight, generator_loss, hinge_d_loss
from tokenizer.evaluate import (evaluate, export_config, family_summary, family_text, psnr,
                                reconstruction_fid)
from tokenizer.kl_loss import kl_losses, step_noise
from tokenizer.msvq_train import scale_scalars
from tokenizer.resume import disk_full_advice, load_checkpoint, run_identity, save_checkpoint
from tokenizer.train_config import TokenizerTrainConfig, TrainConfig, schema_for


# ---------------------------------------------------------------- training pieces

def step_lr(t: TrainConfig, step: int) -> float:
    """The learning rate at `step`: the generator's schedule (common/schedule.py) over the run."""
    return lr_at(step, t.lr, t.warmup, t.steps, t.schedule, t.min_lr_ratio)


def make_optimizer(params, t: TrainConfig):
    return torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)


def rank_noise(t: TrainConfig, raw, x: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """This rank's slice of the step's posterior noise, drawn for the whole global batch."""
    h, w = x.shape[-2] // raw.downsample, x.shape[-1] // raw.downsample
    noise = step_noise((t.batch_size, raw.latent_channels, h, w), t.seed, step)
    return noise[rank * len(x):(rank + 1) * len(x)]


def generator_step(cfg, net, disc, opt, x, step, rank):
    """One tokenizer update; returns (recon, scalars, quantiser or latent stats).

    `disc` is the unwrapped discriminator: the GAN loss only needs its gradient with respect
    to the image, and the stray grads it leaves on D are cleared before D's own step.
    """
    t = cfg.train
    raw = net.module if isinstance(net, DDP) else net
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
        if raw.kind == "continuous":
            noise = rank_noise(t, raw, x, step, rank)
            recon, reg, scalars, stats = kl_losses(net, x, noise, t.kl_weight)
        else:
            recon, q, stats = net(x)
            reg = t.codebook_weight * (q["codebook"] + q["commit"])
            scalars = {"loss/codebook": q["codebook"].detach(), "loss/commit": q["commit"].detach()}
    recon = recon.float()
    rec = F.mse_loss(recon, x) + (t.l1_weight * F.l1_loss(recon, x) if t.l1_weight else 0.0)
    loss = rec + reg
    scalars["loss/rec"] = rec.detach()
    if t.gan and step >= t.disc_start:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
            g = generator_loss(disc(recon).float())
        # the decoder's last conv (both families name it conv_out)
        w = t.disc_weight * adaptive_weight(rec, g, raw.decoder.conv_out.weight)
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


# ---------------------------------------------------------------- main

def main(argv=None) -> dict:
    return run(parse_cli(schema_for(argv), argv, __doc__))


def run(cfg: TokenizerTrainConfig) -> dict:
    check_paths(cfg, {"data.root": "point it at a class-folder dataset (root/<class>/<images>)",
                      "data.eval_root": "point it at held-out class folders, or leave it empty",
                      "train.rfid_ref": f"build it with `python eval_fid.py mode=ref images=HELDOUT "
                                        f"out={cfg.train.rfid_ref}`"})
    t = cfg.train
    info = init_distributed(t.device)
    log = get_logger("tokenizer.train", info.rank)
    check_launch(cfg, info)
    out = Path(cfg.out_dir)
    torch.manual_seed(t.seed)  # same init on every rank
    dataset = ClassFolderDataset(cfg.data.root, cfg.data.resolution)
    identity = run_identity(cfg, dataset)
    raw, disc, opt, opt_d, start = build(cfg, info, log, identity)  # refuses other settings
    log.info(f"{dataset}; {cfg.model.name} tokenizer grid {raw.grid(cfg.data.resolution)}")
    if info.is_main:
        make_folder(out)
        atomic_write_text(out / "config.yaml", to_yaml(cfg))
    if start >= t.steps and (out / "summary.json").is_file() and weights_path(cfg).is_file():
        log.info(f"{out} already holds the finished run; nothing to do")
        cleanup()
        return json.loads((out / "summary.json").read_text())
    # dropout noise differs per rank, and a resumed run draws new masks
    torch.manual_seed(rank_seed(t.seed, info.rank, stride=7919, offset=start * 31))
    net, d_net = wrap_nets(raw, disc, info)
    images = load_all(dataset, t.num_workers) if cfg.data.in_memory else None
    writer = make_writer(out) if info.is_main else None

    t0, restarted, ckpt_path, saved = time.time(), 0, out / "checkpoint.pt", start
    bar = tqdm(total=t.steps, initial=start, disable=not info.is_main, desc=cfg.model.name,
               dynamic_ncols=True)
    for step, x in enumerate(batches(cfg, dataset, images, start, info), start=start):
        x = x.to(info.device, non_blocking=True)
        lr = step_lr(t, step)
        for group in opt.param_groups + (opt_d.param_groups if opt_d else []):
            group["lr"] = lr
        recon, scalars, stats = generator_step(cfg, net, disc, opt, x, step, info.rank)
        if disc is not None and step >= t.disc_start:
            scalars.update(disc_step(d_net, opt_d, x, recon))
        if raw.kind != "continuous":  # VQ and msvq: codes
            restarted += track_codes(raw, stats, t, step)
        if (step + 1) % t.log_every == 0 or step + 1 == t.steps:
            scalars.update({"psnr": psnr(recon, x), "lr": lr,
                            **step_stats(raw, stats, restarted)})
            log_scalars(writer, bar, scalars, window_usage(raw, t), step + 1)
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


def check_launch(cfg, info) -> None:
    """Refuse a global batch the processes cannot split, and an rFID without the Inception
    weights now, not after training."""
    t = cfg.train
    if t.batch_size % info.world_size:
        raise SystemExit(f"error: train.batch_size={t.batch_size} is not divisible by the "
                         f"{info.world_size} processes")
    if info.is_main and t.rfid:
        from evaluation.weights import resolve_weights

        resolve_weights()


def step_stats(raw, stats: dict, restarted: int) -> dict:
    """The batch's statistics to log: codebook usage (VQ; msvq also per scale, from the global
    histogram), or the posterior's (KL)."""
    if raw.kind == "continuous":
        return stats
    per_scale = scale_scalars(all_reduce_sum(stats["counts"])) if raw.kind == "multiscale" else {}
    return {"usage/batch": stats["usage"], "usage/restarted": restarted,
            "usage/perplexity": stats["perplexity"], **per_scale}


def window_usage(raw, t: TrainConfig) -> float | None:
    return raw.quantize.window_usage(t.usage_window) if raw.kind != "continuous" else None


def weights_path(cfg) -> Path:
    return Path(cfg.out_dir) / f"{cfg.model.name}.safetensors"


def wrap_nets(raw, disc, info):
    """The tokenizer and discriminator under DDP when there are several processes. The
    tokenizer's usage buffers are synced by hand (track_codes), not broadcast."""
    if info.world_size == 1:
        return raw, disc
    net = wrap_ddp(raw, info.device, sync_buffers=False, find_unused=has_unused_phi(raw))
    return net, (wrap_ddp(disc, info.device) if disc is not None else None)


def has_unused_phi(raw) -> bool:
    """Whether a multi-scale schedule leaves phi convs unused (VAR's layout keeps
    share_quant_resi convs whatever the number of scales): DDP must then allow unused parameters."""
    q = getattr(raw, "quantize", None)
    return hasattr(q, "phi_of_scale") and len(set(q.phi_of_scale)) < len(q.phi)


def build(cfg, info, log, identity):
    """Tokenizer, optional discriminator, their optimizers; resumed from the checkpoint if any."""
    t = cfg.train
    raw = build_tokenizer(cfg.model).to(info.device)
    check_resolution(cfg, raw)
    disc = PatchDiscriminator(ch=t.disc_ch, n_layers=t.disc_layers).to(info.device) if t.gan else None
    opt = make_optimizer(raw.parameters(), t)
    opt_d = make_optimizer(disc.parameters(), t) if disc is not None else None
    ckpt_path, start = Path(cfg.out_dir) / "checkpoint.pt", 0
    if ckpt_path.is_file():
        start = load_checkpoint(ckpt_path, raw, disc, opt, opt_d, identity)
        log.info(f"resumed from {ckpt_path} at step {start}")
    return raw, disc, opt, opt_d, start


def check_resolution(cfg, raw) -> None:
    """A one-line error naming the settings when the images do not fit the tokenizer's grid."""
    try:
        raw.grid(cfg.data.resolution)
    except ValueError as e:
        what = (f"model.patch_nums={list(cfg.model.patch_nums)}" if raw.kind == "multiscale"
                else f"the {cfg.model.name} tokenizer")
        raise ConfigError(f"data.resolution={cfg.data.resolution} does not fit {what}: {e}") from None


def make_writer(out: Path):
    from torch.utils.tensorboard import SummaryWriter  # imported late: slow import

    return SummaryWriter(str(out))


def log_scalars(writer, bar, scalars, usage, step) -> None:
    vals = {k: float(all_reduce_mean(torch.as_tensor(v, dtype=torch.float32))) for k, v in scalars.items()}
    if usage is not None:
        vals["usage/window"] = usage
    if writer is not None:
        for k, v in vals.items():
            writer.add_scalar(k, v, step)
    extra = {"usage": f"{usage:.2f}"} if usage is not None else \
        {"z_std": f"{vals['latent/sample_std']:.3g}", "kl": f"{vals['loss/kl']:.3g}"}
    bar.set_postfix(loss=f"{vals['loss/total']:.4f}", psnr=f"{vals['psnr']:.1f}", **extra)


def finish(cfg, raw, disc, opt, opt_d, info, log, writer, seconds, start, identity) -> dict:
    out, t = Path(cfg.out_dir), cfg.train
    summary = {}
    if info.is_main:
        save_checkpoint(out / "checkpoint.pt", raw, disc, opt, opt_d, t.steps, identity)
        eval_set = ClassFolderDataset(cfg.data.eval_root or cfg.data.root, cfg.data.resolution)
        ev = evaluate(raw, eval_set, t.eval_images, info.device, out, keep_images=t.rfid, seed=t.seed)
        model_cfg = export_config(cfg, ev)
        weights = save_tokenizer(raw, model_cfg, weights_path(cfg))
        if t.rfid:
            ev["rfid"] = reconstruction_fid(ev, t, info.device)
        summary = {"psnr": round(ev["psnr"], 3), **({"rfid": round(ev["rfid"], 3)} if t.rfid else {}),
                   "eval_images": ev["images"], **family_summary(cfg, raw, ev, model_cfg),
                   "steps": t.steps, "steps_this_run": t.steps - start, "batch_size": t.batch_size,
                   "wall_time_s": round(seconds, 1), "world_size": info.world_size,
                   "weights": str(weights.resolve())}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
        if writer is not None:
            writer.add_scalar("eval/psnr", ev["psnr"], t.steps)
            writer.close()
        rfid = f", rFID {ev['rfid']:.2f}" if t.rfid else ""
        log.info(f"done: {t.steps} steps in {seconds:.0f}s, PSNR {ev['psnr']:.2f} dB{rfid}, "
                 f"{family_text(raw, ev, summary, t)} -> {weights}")
    barrier()
    cleanup()
    return summary


if __name__ == "__main__":
    run_cli(run, schema_for(None), __doc__)
