"""Train an autoregressive generator on cached tokenizer codes (token head) or latents (flow
head, xAR's noisy-context flow matching).

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

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch
from tqdm import tqdm

from ar.checkpoint import check_resume, export_generator, load_resume, save_resume
from ar.conditioning import condition_entry, spec_entry
from ar.config import GeneratorSpec, ModelConfig, tokenizer_kind
from ar.data import BatchStream, CodeCache, LatentCache, open_cache
from ar.ema import EMA
from ar.engine import batch_layout, build_engine, train_step
from ar.model import ARModel
from ar.run_log import (log_metrics, prune_weights, restore_window, truncate_metrics, window_means,
                        window_state)
from common import dist
from common.config import ConfigError, check_fields, check_paths, run_cli, to_yaml
from common.io import DiskFullError, atomic_write_text, make_folder
from common.schedule import lr_at
from sampling.settings import SamplingConfig


# The config schema: one dataclass per component, every field commented; YAML files under
# configs/ are deltas over these defaults. Values that follow from the data (vocabulary size,
# grid, number of classes) are read from the code cache once and stored in the weights file's
# GeneratorSpec; they are never set by hand.

@dataclass
class DataConfig:
    codes: str = "???"  # cache folder written by `python -m tokenizer.encode`: codes (VQ) or latents (KL)


@dataclass
class TrainConfig:
    global_batch: int = 256  # images per optimiser step, summed over processes and accumulation
    micro_batch: Optional[int] = None  # images per process per forward; None: global_batch / processes
    max_steps: int = 1000  # optimiser steps of the whole run (resumed runs count from the start)
    lr: float = 1e-4  # peak learning rate (LlamaGen: 1e-4 at batch 256)
    weight_decay: float = 0.05  # AdamW decay on matrices and tables only
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    warmup_steps: int = 0  # linear learning-rate warm-up
    warmup_frac: float = 0.0  # warm-up as a fraction of max_steps instead (used when warmup_steps is 0; xAR: 0.125)
    schedule: str = "constant"  # constant | cosine | linear (decay after warm-up, or from decay_start)
    decay_start: float = 0.0  # cosine, linear: constant until this fraction of max_steps, then decay (xAR: 0.75)
    min_lr_ratio: float = 0.0  # the decay's floor as a fraction of lr (VAR: 0.01)
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    cond_dropout: float = 0.1  # probability a label is replaced by the null class, or a caption by the empty one (for CFG)
    ema_decay: float = 0.9999  # EMA of the weights (the exported ones)
    ema_warmup: bool = True  # ramp the EMA decay up as (1+s)/(10+s) early in training
    precision: str = "auto"  # auto (bf16 autocast on GPUs and on CPUs with native bf16, else fp32) | bf16 | fp32
    compile: bool = False  # torch.compile the training forward/backward
    engine: str = "ddp"  # ddp (torchrun; a single process needs no launcher) | deepspeed
    zero_stage: int = 1  # DeepSpeed ZeRO stage (1: optimiser states, 2: + gradients)
    seed: int = 0  # seeds the data order, dropout and initialisation
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10  # steps between logged (all-reduced) losses
    ckpt_every: int = 500  # steps between resumable checkpoints (and EMA weight exports)
    keep_ckpts: int = 2  # resumable checkpoints kept on disk; 0: keep all
    sample_every: int = 0  # steps between sample grids in the run folder; 0: only at the end
    threads: int = 0  # CPU threads for torch (0: torch's default)

    def validate(self) -> None:
        check_fields(self, "train.", {
            "global_batch": ">= 1", "micro_batch": ">= 1", "max_steps": ">= 1", "lr": "> 0",
            "weight_decay": ">= 0", "beta1": "[0, 1)", "beta2": "[0, 1)", "warmup_steps": ">= 0",
            "warmup_frac": "[0, 1)", "decay_start": "[0, 1)",
            "schedule": ("constant", "cosine", "linear"), "min_lr_ratio": "[0, 1]", "grad_clip": ">= 0",
            "cond_dropout": "[0, 1)", "ema_decay": "[0, 1]", "precision": ("auto", "bf16", "fp32"),
            "engine": ("ddp", "deepspeed"), "zero_stage": (1, 2), "device": ("auto", "cpu", "cuda"),
            "log_every": ">= 1", "ckpt_every": ">= 1", "keep_ckpts": ">= 0", "sample_every": ">= 0",
            "threads": ">= 0"})


@dataclass
class GridConfig:
    classes: Optional[List[int]] = None  # class ids, one grid row each; None: all (at most 16)
    prompts: Optional[List[str]] = None  # text models: one grid row per prompt; None: 8 of the cache's captions
    per_class: int = 8  # images per row
    seed: int = 0  # noise seed of the grid
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # how grid images are drawn

    def validate(self) -> None:
        check_fields(self, "grid.", {"per_class": ">= 1"})
        if self.classes is not None and (not self.classes or min(self.classes) < 0):
            raise ConfigError(f"grid.classes={self.classes}: class ids are >= 0 (None: all classes)")


@dataclass
class RunConfig:
    out_dir: str = "runs/debug"  # run folder: checkpoints, weights, logs, grids
    model: ModelConfig = field(default_factory=ModelConfig)  # architecture
    data: DataConfig = field(default_factory=DataConfig)  # training data
    train: TrainConfig = field(default_factory=TrainConfig)  # optimisation and engine
    grid: GridConfig = field(default_factory=GridConfig)  # sample grids written during training

    def validate(self) -> None:
        if not self.out_dir.strip():
            raise ConfigError("out_dir is empty; name the run folder")


def warmup_of(t: TrainConfig) -> int:
    """Warm-up steps: warmup_steps, or warmup_frac of max_steps."""
    return t.warmup_steps or round(t.warmup_frac * t.max_steps)


# what each kind of cache holds, and how a model that does not fit it is fixed
_CACHE_HOLDS = {"discrete": "discrete codes, one grid per image (a VQ tokenizer's)",
                "multiscale": "per-scale codes (a multi-scale tokenizer's, VAR's VQVAE)",
                "continuous": "continuous latents (a KL tokenizer's)"}
_TOKENIZER_OF = {"discrete": "a VQ tokenizer", "multiscale": "a multi-scale (msvq) tokenizer",
                 "continuous": "a KL tokenizer"}
_CACHE_FITS = {"discrete": "model.head=token with a single-grid order (raster, cell, subsample, whole)",
               "multiscale": "model.order.name=scale (next-scale, VAR) with model.head=token",
               "continuous": "model.head=flow"}


def open_training_cache(cfg: RunConfig) -> CodeCache | LatentCache:
    """The cache, refused when its kind does not fit the model (head and order)."""
    cache = open_cache(cfg.data.codes)
    found, wanted = cache.meta["kind"], tokenizer_kind(cfg.model)
    if found != wanted:
        raise ConfigError(f"data.codes={cfg.data.codes} holds {_CACHE_HOLDS[found]}, but the model "
                          f"(model.head={cfg.model.head}, model.order.name={cfg.model.order.name}) trains on "
                          f"{_CACHE_HOLDS[wanted]}: set {_CACHE_FITS[found]} to train on this "
                          f"cache, or encode the images with {_TOKENIZER_OF[wanted]}")
    return cache


@dataclass
class RunData:
    """What a run trains on: the cache, its conditions (the condition entry's training side),
    the architecture they dictate, and the identity every checkpoint records."""

    cache: Any  # CodeCache | ScaleCodeCache | LatentCache
    source: Any  # the condition entry's source: LabelSource, CaptionSource, ...
    spec: GeneratorSpec
    identity: dict


def prepare_data(cfg: RunConfig) -> RunData:
    """Open the cache and its conditions; the spec and identity follow from them. The grid's
    rows are checked here, before training rather than at its end."""
    cache = open_training_cache(cfg)
    source = condition_entry(cfg.model.condition).source(cfg.data.codes, cache)
    spec = GeneratorSpec(model=cfg.model, **cache.spec_fields(), **source.spec_fields())
    spec_entry(spec).check_rows(spec, cfg.grid.classes, cfg.grid.prompts, "grid.classes")
    identity = {"data": {**cache.identity(), **source.identity()}, "model": asdict(cfg.model),
                "train": {k: getattr(cfg.train, k) for k in RESUME_KEYS}}
    return RunData(cache, source, spec, identity)


@torch.no_grad()
def write_grid(cfg: RunConfig, ema_model: ARModel, spec: GeneratorSpec, path: Path, log) -> None:
    """A grid (one row per class, or per prompt) from the EMA weights, if the tokenizer file
    (and whatever else the condition needs) is at hand."""
    from sampling.generate import generate
    from sampling.outputs import decode_codes, save_grid
    from tokenizer import load_tokenizer

    if not Path(spec.tokenizer_path).is_file():
        log.warning(f"tokenizer {spec.tokenizer_path} not found: no grid written")
        return
    device = ema_model.levels.device
    tokenizer = load_tokenizer(spec.tokenizer_path, device=device)
    entry = spec_entry(spec)
    missing = entry.missing(spec)
    if missing is not None:
        log.warning(f"{missing}: no grid written")
        return
    classes, prompts = entry.training_rows(spec, cfg.data.codes, cfg.grid.classes, cfg.grid.prompts)
    rows, names = ema_model.cond.grid_rows(classes, prompts, device, key="grid.classes")
    cond = rows.repeat_rows(cfg.grid.per_class)
    codes = generate(ema_model, cond, torch.arange(len(cond), device=device), cfg.grid.seed,
                     cfg.grid.sampling)
    images = decode_codes(tokenizer, codes)
    save_grid(images, cfg.grid.per_class, path, names)
    log.info(f"wrote {path}")


# settings that define a run: resuming with any of them changed is refused (the others, such as
# max_steps, micro_batch, precision or the logging intervals, may change between resumes)
RESUME_KEYS = ("global_batch", "lr", "weight_decay", "beta1", "beta2", "warmup_steps", "warmup_frac",
               "schedule", "decay_start", "min_lr_ratio", "grad_clip", "cond_dropout", "ema_decay", "ema_warmup", "engine",
               "zero_stage", "seed")


@dataclass
class Run:
    """A training run's state between steps."""

    folder: Path
    model: ARModel
    ema: EMA
    eng: Any  # ar.engine.Engine
    stream: BatchStream
    step: int = 0
    samples: int = 0  # images consumed: the data position
    window: dict = field(default_factory=dict)  # summed metrics since the last log line
    window_steps: int = 0
    last: dict = field(default_factory=dict)  # the latest logged metrics
    saved_step: int = 0
    norm: Any = None  # the last step's gradient norm
    writer: Any = None  # tensorboard (main process)


def build_run(cfg: RunConfig, data: RunData, ckpt: Path | None, info, micro: int, accum: int,
              log) -> Run:
    """Model, EMA, engine and data stream; resumed from `ckpt` when there is one."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = ARModel(data.spec).to(info.device)
    model.inputs.prepare_training(data.spec)  # e.g. next-scale: the tokenizer's quantiser
    data.source.fill_null(model.cond)  # e.g. the empty caption (saved with the weights)
    ema = EMA(model, cfg.train.ema_decay, cfg.train.ema_warmup)
    eng = build_engine(cfg.train, model, info, micro, accum)
    torch.manual_seed(dist.rank_seed(cfg.train.seed, info.rank, stride=info.world_size, offset=1))  # dropout differs per rank
    log.info(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters; {info.world_size} "
             f"process(es), micro batch {micro} x {accum} accumulation = global {cfg.train.global_batch}")
    stream = BatchStream(data.cache, cfg.train.seed, cfg.train.cond_dropout, data.source)
    run = Run(Path(cfg.out_dir), model, ema, eng, stream)
    if ckpt is not None:
        run.step, run.samples, rank_state = load_resume(ckpt, model, eng.optimizer, ema, info, eng.deepspeed)
        run.window, run.window_steps = restore_window(rank_state, info.device)
        log.info(f"resumed from {ckpt} at step {run.step}")
    run.saved_step = run.step
    if info.is_main:
        from torch.utils.tensorboard import SummaryWriter

        make_folder(run.folder)
        atomic_write_text(run.folder / "config.yaml", to_yaml(cfg))
        run.last = truncate_metrics(run.folder / "metrics.jsonl", run.step, log)
        run.writer = SummaryWriter(str(run.folder / "tb"), purge_step=run.step)
    return run


def train_one_step(cfg: RunConfig, run: Run, info, micro: int, accum: int) -> float:
    """One optimiser step and the EMA update; returns the step's learning rate."""
    t = cfg.train
    lr = lr_at(run.step, t.lr, warmup_of(t), t.max_steps, t.schedule, t.min_lr_ratio, t.decay_start)
    for group in run.eng.optimizer.param_groups:
        group["lr"] = lr
    stats, run.norm = train_step(t, run.eng, run.model, run.stream, run.samples, info, micro, accum)
    run.ema.update(run.model, run.step)
    run.step, run.samples = run.step + 1, run.samples + t.global_batch
    run.window = {k: run.window.get(k, 0.0) + v for k, v in stats.items()}
    run.window_steps += 1
    return lr


def log_step(cfg: RunConfig, run: Run, lr: float, seconds: float, bar) -> None:
    """The window's means over steps and processes: the progress bar, tensorboard, metrics.jsonl."""
    speed = run.window_steps * cfg.train.global_batch / seconds
    run.last = {"step": run.step, **window_means(run.window, run.window_steps), "lr": lr,
                "grad_norm": float(run.norm), "samples_per_s": speed,
                "tokens_per_s": speed * run.model.num_tokens}
    bar.set_postfix(loss=f"{run.last['loss']:.4f}", lr=f"{lr:.2e}")
    if run.writer is not None:
        log_metrics(run.folder, run.writer, run.last)
    run.window, run.window_steps = {}, 0


def save_step(cfg: RunConfig, run: Run, info, identity: dict) -> None:
    """A resumable checkpoint (every rank) and the EMA weights of this step (main process)."""
    save_resume(run.folder, run.step, run.samples, run.model, run.eng.optimizer, run.ema, info,
                cfg.train.keep_ckpts, run.eng.deepspeed, identity, window_state(run.window, run.window_steps))
    run.saved_step = run.step
    if info.is_main:
        export_generator(run.folder / "weights" / f"step_{run.step:07d}.safetensors", run.ema.model,
                         to_yaml(cfg))
        prune_weights(run.folder / "weights", cfg.train.keep_ckpts)


def train(cfg: RunConfig, run: Run, data: RunData, info, micro: int, accum: int, log) -> None:
    """Steps up to train.max_steps: log, checkpoint and sample grids on their intervals."""
    t = cfg.train
    t_log = time.time()
    bar = tqdm(total=t.max_steps, initial=run.step, desc="train", disable=not info.is_main)
    try:
        while run.step < t.max_steps:
            lr = train_one_step(cfg, run, info, micro, accum)
            bar.update(1)
            end = run.step == t.max_steps
            if run.step % t.log_every == 0 or end:
                log_step(cfg, run, lr, time.time() - t_log, bar)
                t_log = time.time()
            if run.step % t.ckpt_every == 0 or end:
                save_step(cfg, run, info, data.identity)
            if info.is_main and t.sample_every and run.step % t.sample_every == 0:
                write_grid(cfg, run.ema.model, data.spec, run.folder / f"grid_{run.step:07d}.png", log)
        bar.close()  # before the final grid's own progress
        if info.is_main:
            export_final(cfg, run.folder, run.ema.model, data.spec, run.step, run.last, log)
    except DiskFullError as e:
        raise DiskFullError(e.path, f"free space and run the same command again; the last "
                                    f"complete checkpoint is step {run.saved_step}") from e
    finally:  # a bar left open is redrawn at exit, after the error line
        bar.close()


def main(cfg: RunConfig) -> dict:
    check_paths(cfg, {"data.codes": "create the code cache with `python -m tokenizer.encode`"})
    info = dist.init_distributed(cfg.train.device)
    log = dist.get_logger("train", info.rank)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    folder = Path(cfg.out_dir)
    data = prepare_data(cfg)
    micro, accum = batch_layout(cfg.train, info.world_size)
    ckpt, done = check_resume(folder, data.identity, cfg.train.max_steps, log)
    if done is not None:
        log.info(f"{folder} already finished at step {done['steps']} (weights in "
                 f"{folder / 'weights' / 'ema.safetensors'}); nothing to do. Raise "
                 f"train.max_steps to train on, or choose another out_dir= for a new run")
        dist.cleanup()
        return done["final"]
    run = build_run(cfg, data, ckpt, info, micro, accum, log)
    run.model.train()
    train(cfg, run, data, info, micro, accum, log)
    dist.barrier()
    dist.cleanup()
    return run.last


def export_final(cfg: RunConfig, run: Path, ema_model: ARModel, spec: GeneratorSpec, step: int,
                 last: dict, log) -> None:
    """The EMA weights sample.py reads, the final grid, and summary.json (written last: a run
    with a summary of its last step is finished)."""
    export_generator(run / "weights" / "ema.safetensors", ema_model, to_yaml(cfg))
    prune_weights(run / "weights", cfg.train.keep_ckpts)  # and what a kill mid-export left
    write_grid(cfg, ema_model, spec, run / "grid_final.png", log)
    parameters = sum(p.numel() for p in ema_model.parameters())
    atomic_write_text(run / "summary.json", json.dumps(
        {"steps": step, "final": last, "parameters": parameters}, indent=2))
    log.info(f"done: step {step}, loss {last.get('loss', float('nan')):.4f}; "
             f"weights in {run / 'weights' / 'ema.safetensors'}")


if __name__ == "__main__":
    run_cli(main, RunConfig, __doc__)
