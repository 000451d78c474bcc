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
from typing import List, Optional

import torch
from tqdm import tqdm

from ar.checkpoint import (check_identity, checkpoint_step, export_generator, latest_checkpoint,
                           load_resume, save_resume)
from ar.data import BatchStream, CaptionCache, CodeCache, LatentCache, ScaleCodeCache, open_cache
from ar.ema import EMA
from ar.engine import batch_layout, build_engine, train_step
from ar.model import ARModel, GeneratorSpec, ModelConfig, MultiScaleSpec, TextSpec, tokenizer_kind
from ar.optim import lr_at
from common import dist
from common.config import ConfigError, check_fields, check_paths, run_cli, to_yaml
from common.io import DiskFullError, atomic_write_text, make_folder, translate_disk_full
from sampling.generate import SamplingConfig


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
               "multiscale": "model.order=scale (next-scale, VAR) with model.head=token",
               "continuous": "model.head=flow"}


def open_training_cache(cfg: RunConfig) -> CodeCache | LatentCache:
    """The cache, refused when its kind does not fit the model (head and order)."""
    cache = open_cache(cfg.data.codes)
    found, wanted = cache.meta["kind"], tokenizer_kind(cfg.model)
    if found != wanted:
        raise ConfigError(f"data.codes={cfg.data.codes} holds {_CACHE_HOLDS[found]}, but the model "
                          f"(model.head={cfg.model.head}, model.order={cfg.model.order}) trains on "
                          f"{_CACHE_HOLDS[wanted]}: set {_CACHE_FITS[found]} to train on this "
                          f"cache, or encode the images with {_TOKENIZER_OF[wanted]}")
    return cache


def open_captions(cfg: RunConfig, cache) -> CaptionCache | None:
    """The cache's caption side for a text model (named errors when it has none)."""
    if cfg.model.condition != "text":
        return None
    return CaptionCache(cfg.data.codes, cache.count)


def text_spec(captions: CaptionCache | None) -> TextSpec:
    if captions is None:
        return TextSpec()
    m = captions.meta
    tok, encoder = m.get("tokenizer") or {}, m.get("encoder") or {}
    return TextSpec(kind=m["kind"], max_tokens=captions.max_tokens, tokenizer=tok.get("kind", ""),
                    tokenizer_json=captions.tokenizer_json(), vocab_size=tok.get("vocab_size", 0),
                    channels=m.get("channels", 0), encoder=encoder.get("path", ""),
                    encoder_sha256=encoder.get("sha256", ""))


def make_spec(cfg: RunConfig, cache: CodeCache | LatentCache,
              captions: CaptionCache | None = None) -> GeneratorSpec:
    """The architecture: the model config plus what the cache dictates."""
    tok = cache.meta["tokenizer"]
    multiscale = MultiScaleSpec()
    if isinstance(cache, ScaleCodeCache):  # the quantiser's facts, from the tokenizer's config
        t = tok["config"]
        multiscale = MultiScaleSpec(patch_nums=cache.scales, code_dim=t["codebook_dim"],
                                    quant_resi=t["quant_resi"], share_quant_resi=t["share_quant_resi"])
    return GeneratorSpec(model=cfg.model, vocab_size=getattr(cache, "codebook_size", 0),
                         latent_channels=getattr(cache, "channels", 0), multiscale=multiscale,
                         grid_h=cache.grid_h,
                         grid_w=cache.grid_w, num_classes=cache.num_classes,
                         class_names=cache.class_names, resolution=int(cache.meta["resolution"]),
                         tokenizer_path=tok["path"], tokenizer_sha256=tok["sha256"],
                         text=text_spec(captions))


def check_grid(cfg: RunConfig, spec: GeneratorSpec) -> None:
    """The grids' rows, checked before training rather than at its end."""
    from sampling.prompts import check_class_ids

    if cfg.grid.classes and spec.text.kind:
        raise ConfigError(f"grid.classes={cfg.grid.classes}: this model is text-to-image, its grid "
                          f"rows are grid.prompts (or 8 of the cache's captions)")
    if cfg.grid.classes:
        check_class_ids(spec, cfg.grid.classes, "grid.classes")


def grid_prompts(cfg: RunConfig) -> list[str]:
    """The grid's prompts: grid.prompts, or 8 captions spread over the cache."""
    if cfg.grid.prompts:
        return list(cfg.grid.prompts)
    from tokenizer.text_cache import read_captions

    captions = read_captions(Path(cfg.data.codes))
    return [captions[i * len(captions) // 8] for i in range(min(8, len(captions)))]


@torch.no_grad()
def write_grid(cfg: RunConfig, ema_model: ARModel, spec: GeneratorSpec, path: Path, log) -> None:
    """A grid (one row per class, or per prompt) from the EMA weights, if the tokenizer file
    is at hand."""
    from sampling.generate import generate
    from sampling.outputs import decode_codes, save_grid
    from sampling.prompts import grid_rows
    from tokenizer import load_tokenizer

    if not Path(spec.tokenizer_path).is_file():
        log.warning(f"tokenizer {spec.tokenizer_path} not found: no grid written")
        return
    device = ema_model.levels.device
    tokenizer = load_tokenizer(spec.tokenizer_path, device=device)
    prompts = grid_prompts(cfg) if spec.text.kind else None
    if spec.text.kind == "features" and not Path(spec.text.encoder).is_dir():
        log.warning(f"text encoder {spec.text.encoder} not found: no grid written")
        return
    classes = cfg.grid.classes or list(range(min(spec.num_classes, 16)))
    rows, names = grid_rows(ema_model, classes, prompts, device, key="grid.classes")
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


def copy_quantizer(model: ARModel, spec: GeneratorSpec) -> None:
    """Next-scale inputs rebuild features with the tokenizer's quantiser: copy it (frozen)
    from the tokenizer file the cache was encoded with."""
    from tokenizer import load_tokenizer, tokenizer_sha256

    path = Path(spec.tokenizer_path)
    why = "next-scale training rebuilds its inputs with that tokenizer's quantiser"
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} (recorded in data.codes's meta.json) not found; "
                                f"{why}: put the file back, or re-encode the cache")
    if tokenizer_sha256(path) != spec.tokenizer_sha256:
        raise ValueError(f"tokenizer {path} changed since the cache was encoded (sha256 differs); "
                         f"{why}: re-encode the cache with it, or restore the original file")
    model.inputs.load_quantizer(load_tokenizer(path, device=model.levels.device))


def run_identity(cfg: RunConfig, cache: CodeCache | LatentCache,
                 captions: CaptionCache | None = None) -> dict:
    """What this run trains on and the settings that define it, stored with every checkpoint."""
    meta = cache.meta
    size = {"codebook_size": meta["codebook_size"]} if "codebook_size" in meta else \
        {"channels": meta["channels"], "latent_scale": meta["latent_scale"]}
    data = {"tokenizer_sha256": meta["tokenizer"]["sha256"], "grid": list(meta["grid"]),
            **size, "count": meta["count"], "fingerprint": cache.fingerprint(),
            "num_classes": meta["num_classes"], "resolution": meta["resolution"],
            "variants": list(meta["variants"])}
    if captions is not None:
        data["text"] = {k: captions.meta[k] for k in ("kind", "max_tokens", "captions_sha256", "settings")}
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
    cache = open_training_cache(cfg)
    captions = open_captions(cfg, cache)
    spec = make_spec(cfg, cache, captions)
    check_grid(cfg, spec)
    identity = run_identity(cfg, cache, captions)
    micro, accum = batch_layout(cfg.train, info.world_size)
    ckpt, done = check_resume(cfg, run, identity, log)
    if done is not None:
        log.info(f"{run} already finished at step {done['steps']} (weights in "
                 f"{run / 'weights' / 'ema.safetensors'}); nothing to do. Raise "
                 f"train.max_steps to train on, or choose another out_dir= for a new run")
        dist.cleanup()
        return done["final"]

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = ARModel(spec).to(info.device)
    if spec.multiscale.patch_nums:
        copy_quantizer(model, spec)
    if captions is not None:  # the empty caption, what dropped captions become (saved with the weights)
        model.cond.null_text.copy_(torch.from_numpy(captions.null))
    ema = EMA(model, cfg.train.ema_decay, cfg.train.ema_warmup)
    eng = build_engine(cfg.train, model, info, micro, accum)
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
        make_folder(run)
        atomic_write_text(run / "config.yaml", to_yaml(cfg))
        last = _truncate_metrics(run / "metrics.jsonl", step, log)
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(run / "tb"), purge_step=step)

    stream = BatchStream(cache, cfg.train.seed, cfg.train.cond_dropout, captions)
    model.train()
    t_log = time.time()
    bar = tqdm(total=cfg.train.max_steps, initial=step, desc="train", disable=not info.is_main)
    try:
        while step < cfg.train.max_steps:
            lr = lr_at(step, cfg.train.lr, warmup_of(cfg.train), cfg.train.max_steps,
                       cfg.train.schedule, cfg.train.min_lr_ratio, cfg.train.decay_start)
            for group in eng.optimizer.param_groups:
                group["lr"] = lr
            stats, norm = train_step(cfg.train, eng, model, stream, samples, info, micro, accum)
            ema.update(model, step)
            step, samples = step + 1, samples + cfg.train.global_batch
            window = {k: window.get(k, 0.0) + v for k, v in stats.items()}
            window_steps += 1
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                speed = window_steps * cfg.train.global_batch / (time.time() - t_log)
                last = {"step": step, **window_means(window, window_steps), "lr": lr,
                        "grad_norm": float(norm), "samples_per_s": speed,
                        "tokens_per_s": speed * model.num_tokens}
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
        bar.close()  # before the final grid's own progress
        if info.is_main:
            export_final(cfg, run, ema.model, spec, step, last, log)
    except DiskFullError as e:
        raise DiskFullError(e.path, f"free space and run the same command again; the last "
                                    f"complete checkpoint is step {saved_step}") from e
    finally:  # a bar left open is redrawn at exit, after the error line
        bar.close()
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
