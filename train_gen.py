"""Train an autoregressive generator on cached tokenizer codes.

    # one process (CPU or one GPU)
    python train_gen.py --config configs/quickstart.yaml [key=value ...]
    # DDP on 8 GPUs (gloo on CPU-only machines)
    torchrun --nproc_per_node=8 train_gen.py --config configs/imagenet256/AR-B.yaml
    # DeepSpeed ZeRO-2 through the same script and launcher
    torchrun --nproc_per_node=8 train_gen.py --config configs/imagenet256/AR-XL.yaml \
        train.engine=deepspeed train.zero_stage=2

Re-running the same command resumes from the newest checkpoint in `out_dir`. The run folder
holds config.yaml (resolved), metrics.jsonl, tensorboard events, grid_*.png, checkpoints/
and weights/ema.safetensors (EMA weights + architecture, what sample.py reads).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from ar.checkpoint import (check_identity, checkpoint_step, export_generator, latest_checkpoint,
                           load_resume, save_resume)
from ar.conditioning import ClassCondition
from ar.data import BatchStream, CodeCache
from ar.ema import EMA
from ar.model import ARModel, GeneratorSpec
from ar.optim import deepspeed_config, lr_at, make_adamw
from ar.schema import RunConfig
from common import dist, precision
from common.config import ConfigError, check_paths, run_cli, to_yaml
from common.io import DiskFullError, atomic_write_text, translate_disk_full


def make_spec(cfg: RunConfig, cache: CodeCache) -> GeneratorSpec:
    """The architecture: the model config plus what the code cache dictates."""
    tok = cache.meta["tokenizer"]
    return GeneratorSpec(model=cfg.model, vocab_size=cache.codebook_size, grid_h=cache.grid_h,
                         grid_w=cache.grid_w, num_classes=cache.num_classes,
                         class_names=cache.class_names, resolution=int(cache.meta["resolution"]),
                         tokenizer_path=tok["path"], tokenizer_sha256=tok["sha256"])


def batch_layout(cfg: RunConfig, world: int) -> tuple[int, int]:
    """(micro batch per process, accumulation steps) for the configured global batch."""
    g = cfg.train.global_batch
    micro = cfg.train.micro_batch or g // world
    if micro <= 0 or g % (world * micro):
        raise ConfigError(f"train.global_batch={g} must be a multiple of processes ({world}) x "
                          f"train.micro_batch ({micro})")
    return micro, g // (world * micro)


def autocast(cfg: RunConfig, device: torch.device):
    if cfg.train.engine == "deepspeed":  # DeepSpeed runs the model in bf16 itself
        return contextlib.nullcontext()
    return precision.autocast(cfg.train.precision, device)


@dataclass
class Engine:
    forward: Callable  # what the batch goes through: the model, DDP, DeepSpeed or compiled
    optimizer: torch.optim.Optimizer
    ddp: Any = None  # the DDP wrapper, for no_sync during accumulation
    deepspeed: Any = None  # the DeepSpeed engine, which owns backward/step/clipping


def build_engine(cfg: RunConfig, model: ARModel, info: dist.DistInfo, micro: int, accum: int) -> Engine:
    t = cfg.train
    optimizer = make_adamw(model, t.lr, (t.beta1, t.beta2), t.weight_decay, info.device)
    eng = Engine(forward=model, optimizer=optimizer)
    if t.engine == "deepspeed":
        import deepspeed  # imported lazily: a heavy import that only this path needs

        bf16 = precision.use_bf16(t.precision, info.device)
        ds_cfg = deepspeed_config(t.global_batch, micro, accum, t.grad_clip, t.zero_stage, bf16)
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if info.device.type == "cuda" else "gloo")
        eng.deepspeed, eng.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                   config=ds_cfg)
        eng.forward = eng.deepspeed
    elif info.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        eng.ddp = eng.forward = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    if t.compile:
        eng.forward = torch.compile(eng.forward)
    return eng


def train_step(cfg: RunConfig, eng: Engine, model: ARModel, stream: BatchStream, samples: int,
               info: dist.DistInfo, micro: int, accum: int) -> tuple[dict, torch.Tensor]:
    """One optimiser step over the global batch; returns (the head's metrics on this rank,
    loss included, averaged over the micro-batches; grad norm)."""
    stats: dict[str, torch.Tensor] = {}
    for m in range(accum):
        offset = samples + (m * info.world_size + info.rank) * micro  # this rank's slice
        codes, cond = stream.batch(offset, micro)
        # gradients are all-reduced on the last micro-step only
        sync = eng.ddp.no_sync() if eng.ddp is not None and m < accum - 1 else contextlib.nullcontext()
        with sync:
            with autocast(cfg, info.device):
                out = eng.forward(codes.to(info.device, non_blocking=True), cond.to(info.device))
            if eng.deepspeed is not None:
                eng.deepspeed.backward(out["loss"])  # DeepSpeed divides by the accumulation steps
                eng.deepspeed.step()
            else:
                (out["loss"] / accum).backward()
        for name, value in out.items():
            stats[name] = stats.get(name, 0.0) + value.detach().float() / accum
    if eng.deepspeed is not None:
        return stats, torch.tensor(float(eng.deepspeed.get_global_grad_norm() or 0.0))
    clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    eng.optimizer.step()
    eng.optimizer.zero_grad(set_to_none=True)
    return stats, norm


@torch.no_grad()
def write_grid(cfg: RunConfig, ema_model: ARModel, spec: GeneratorSpec, path: Path, log) -> None:
    """A grid (one row per class) from the EMA weights, if the tokenizer file is at hand."""
    from sampling.generate import generate
    from sampling.outputs import decode_codes, save_grid
    from tokenizer import load_tokenizer

    if not Path(spec.tokenizer_path).is_file():
        log.warning(f"tokenizer {spec.tokenizer_path} not found: no grid written")
        return
    device = ema_model.rope.device
    tokenizer = load_tokenizer(spec.tokenizer_path, device=device)
    classes = cfg.grid.classes or list(range(min(spec.num_classes, 16)))
    labels = torch.tensor(classes, device=device).repeat_interleave(cfg.grid.per_class)
    codes = generate(ema_model, ClassCondition(labels), torch.arange(len(labels), device=device), cfg.grid.seed,
                     cfg.grid.sampling)
    images = decode_codes(tokenizer, codes)
    save_grid(images, cfg.grid.per_class, path, [spec.class_names[c] for c in classes])
    log.info(f"wrote {path}")


# settings that define a run: resuming with any of them changed is refused (the others, such as
# max_steps, micro_batch, precision or the logging intervals, may change between resumes)
RESUME_KEYS = ("global_batch", "lr", "weight_decay", "beta1", "beta2", "warmup_steps", "schedule",
               "min_lr_ratio", "grad_clip", "cond_dropout", "ema_decay", "ema_warmup", "engine",
               "zero_stage", "seed")


def run_identity(cfg: RunConfig, cache: CodeCache) -> dict:
    """What this run trains on and the settings that define it, stored with every checkpoint."""
    meta = cache.meta
    data = {"tokenizer_sha256": meta["tokenizer"]["sha256"], "grid": list(meta["grid"]),
            "codebook_size": meta["codebook_size"], "count": meta["count"],
            "num_classes": meta["num_classes"], "resolution": meta["resolution"],
            "variants": list(meta["variants"])}
    return {"data": data, "model": asdict(cfg.model),
            "train": {k: getattr(cfg.train, k) for k in RESUME_KEYS}}


def finished_run(run: Path, step: int, cfg: RunConfig) -> dict | None:
    """The summary of a run that already reached max_steps and exported its weights."""
    summary = run / "summary.json"
    if step < cfg.train.max_steps or not (run / "weights" / "ema.safetensors").is_file() \
            or not summary.is_file():
        return None
    try:
        done = json.loads(summary.read_text())
    except json.JSONDecodeError:
        return None
    return done if done.get("steps") == step else None


def check_resume(cfg: RunConfig, run: Path, identity: dict, log) -> tuple[Path | None, dict | None]:
    """(latest checkpoint, summary if the run is already finished); refuses a checkpoint made
    with other data or settings, or one past max_steps."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return None, None
    if not check_identity(ckpt, identity, run):
        log.warning(f"{ckpt} records no data identity (an older checkpoint): resuming unchecked")
    if checkpoint_step(ckpt) > cfg.train.max_steps:
        raise ValueError(f"{ckpt} is past train.max_steps={cfg.train.max_steps}; raise "
                         f"train.max_steps or choose another out_dir=")
    return ckpt, finished_run(run, checkpoint_step(ckpt), cfg)


def main(cfg: RunConfig) -> dict:
    check_paths(cfg, {"data.codes": "create the code cache with `python -m tokenizer.encode`"})
    info = dist.init_distributed(cfg.train.device)
    log = dist.get_logger("train", info.rank)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    run = Path(cfg.out_dir)
    cache = CodeCache(cfg.data.codes)
    spec = make_spec(cfg, cache)
    identity = run_identity(cfg, cache)
    micro, accum = batch_layout(cfg, info.world_size)
    ckpt, done = check_resume(cfg, run, identity, log)
    if done is not None:
        log.info(f"{run} already finished at step {done['steps']} (weights in "
                 f"{run / 'weights' / 'ema.safetensors'}); nothing to do. Raise "
                 f"train.max_steps to train on, or choose another out_dir= for a new run")
        dist.cleanup()
        return done["final"]

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = ARModel(spec).to(info.device)
    ema = EMA(model, cfg.train.ema_decay, cfg.train.ema_warmup)
    eng = build_engine(cfg, model, info, micro, accum)
    torch.manual_seed(cfg.train.seed * info.world_size + info.rank + 1)  # dropout differs per rank
    log.info(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {info.world_size} "
             f"process(es), micro batch {micro} x {accum} accumulation = global {cfg.train.global_batch}")

    step, samples = 0, 0
    # the losses of the steps since the last log line: kept in checkpoints, so a resumed run logs
    # the same averages as an uninterrupted one whatever ckpt_every and log_every are
    window, window_steps = {}, 0
    if ckpt is not None:
        step, samples, rank_state = load_resume(ckpt, model, eng.optimizer, ema, info, eng.deepspeed)
        if "log_window" in rank_state:
            names = rank_state.get("log_names", ["loss", "acc"])  # older checkpoints: the two
            window = dict(zip(names, rank_state["log_window"].to(info.device).unbind()))
            window_steps = int(rank_state["log_steps"])
        log.info(f"resumed from {ckpt} at step {step}")
    writer, saved_step, last = None, step, {}
    if info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.yaml", to_yaml(cfg))
        last = _truncate_metrics(run / "metrics.jsonl", step, log)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / "tb"), purge_step=step)

    stream = BatchStream(cache, cfg.train.seed, cfg.train.cond_dropout)
    model.train()
    t_log = time.time()
    bar = tqdm(total=cfg.train.max_steps, initial=step, desc="train", disable=not info.is_main)
    try:
        while step < cfg.train.max_steps:
            lr = lr_at(step, cfg.train.lr, cfg.train.warmup_steps, cfg.train.max_steps,
                       cfg.train.schedule, cfg.train.min_lr_ratio)
            for group in eng.optimizer.param_groups:
                group["lr"] = lr
            stats, norm = train_step(cfg, eng, model, stream, samples, info, micro, accum)
            ema.update(model, step)
            step, samples = step + 1, samples + cfg.train.global_batch
            window = {k: window.get(k, 0.0) + v for k, v in stats.items()}
            window_steps += 1
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                speed = window_steps * cfg.train.global_batch / (time.time() - t_log)
                last = {"step": step, **window_means(window, window_steps), "lr": lr,
                        "grad_norm": float(norm), "samples_per_s": speed,
                        "tokens_per_s": speed * spec.grid_h * spec.grid_w}
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
                if writer is not None:
                    _log_metrics(run, writer, last)
                window, window_steps, t_log = {}, 0, time.time()
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.max_steps:
                save_resume(run, step, samples, model, eng.optimizer, ema, info, cfg.train.keep_ckpts,
                            eng.deepspeed, identity,
                            window_state(window, window_steps))
                saved_step = step
                if info.is_main:
                    export_generator(run / "weights" / f"step_{step:07d}.safetensors", ema.model,
                                     to_yaml(cfg))
                    _prune(run / "weights", cfg.train.keep_ckpts)
            if info.is_main and cfg.train.sample_every and step % cfg.train.sample_every == 0:
                write_grid(cfg, ema.model, spec, run / f"grid_{step:07d}.png", log)
        bar.close()
        if info.is_main:
            export_final(cfg, run, ema.model, spec, step, last, log)
    except DiskFullError as e:
        raise DiskFullError(e.path, f"free space and run the same command again; the last "
                                    f"complete checkpoint is step {saved_step}") from e
    dist.barrier()
    dist.cleanup()
    return last


def _names(window: dict) -> list[str]:
    return sorted(window, key=lambda k: (k != "loss", k))  # the loss first, then the head's own


def window_means(window: dict, steps: int) -> dict:
    """The metrics' means over the window's steps and over all processes."""
    names = _names(window)
    values = dist.all_reduce_mean(torch.stack([window[k] for k in names])) / steps
    return dict(zip(names, values.tolist()))


def window_state(window: dict, steps: int) -> dict:
    """This rank's unlogged window, for the checkpoint (tensors and names only)."""
    names = _names(window)
    values = torch.stack([window[k] for k in names]).cpu() if names else torch.zeros(0)
    return {"log_window": values, "log_names": names, "log_steps": steps}


def export_final(cfg: RunConfig, run: Path, ema_model: ARModel, spec: GeneratorSpec, step: int,
                 last: dict, log) -> None:
    """The EMA weights sample.py reads, the final grid, and summary.json (written last: a run
    with a summary of its last step is finished)."""
    export_generator(run / "weights" / "ema.safetensors", ema_model, to_yaml(cfg))
    write_grid(cfg, ema_model, spec, run / "grid_final.png", log)
    parameters = sum(p.numel() for p in ema_model.parameters())
    atomic_write_text(run / "summary.json", json.dumps(
        {"steps": step, "final": last, "parameters": parameters}, indent=2))
    log.info(f"done: step {step}, loss {last.get('loss', float('nan')):.4f}; "
             f"weights in {run / 'weights' / 'ema.safetensors'}")


def _log_metrics(run: Path, writer, metrics: dict) -> None:
    step = metrics["step"]
    for k, v in metrics.items():
        if k != "step":
            writer.add_scalar(f"train/{k}", v, step)
    writer.flush()
    path = run / "metrics.jsonl"
    with translate_disk_full(path), open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")


def _truncate_metrics(path: Path, step: int, log) -> dict:
    """After a resume, drop log lines the interrupted run wrote past its last checkpoint, and
    lines a kill or a full disk tore; returns the last line kept (the run's latest metrics)."""
    if not path.is_file():
        return {}
    keep, torn = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError
        except ValueError:
            torn.append(number)
            continue
        if record["step"] <= step:
            keep.append(record)
    if torn:
        log.warning(f"{path}: dropped unreadable line(s) {torn} (torn by an interrupted write)")
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return keep[-1] if keep else {}


def _prune(folder: Path, keep: int) -> None:
    old = sorted(folder.glob("step_*.safetensors"))
    for p in old[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)
        p.with_suffix(".yaml").unlink(missing_ok=True)


if __name__ == "__main__":
    run_cli(main, RunConfig, __doc__)
