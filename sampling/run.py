"""Sampling runs as library functions: what `sample.py` (and `reproduce.py`) run.

    cfg = load_config(SampleRunConfig, overrides=[...])
    model, tokenizer = load_models(cfg, device, log)
    sample_grid(cfg, model, tokenizer, device, log)      # one row per class -> cfg.out (.png)
    sample_images(cfg, model, tokenizer, info, log)      # PNG shards + samples.npz in cfg.out

Image i is generated with noise keyed by (seed, i) and gets label i % classes (balanced) or a
label hashed from (seed, i) (random), so the images do not depend on the number of processes
or the batch size. Text-to-image generators take `prompt=` or `prompts=FILE` instead of
classes: a grid row per prompt, and image i gets prompt i % prompts (or a hashed one); the
.npz then holds each image's prompt ("prompts") beside its prompt index (arr_1). Finished shards
are kept: running again resumes.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch
from tqdm import tqdm

from ar.checkpoint import load_generator
from ar.config import tokenizer_kind
from common import dist, precision
from common.config import ConfigError, check_fields
from common.io import DiskFullError, atomic_write_text, sha256_file
from common.precision import PRECISIONS
from sampling import noise
from sampling.context import compiled_extend
from sampling.settings import SamplingConfig
from sampling.outputs import (decode_codes, npz_done, pack_npz, read_shard_cost, save_grid,
                              shard_done, write_shard)
from sampling.prompts import read_prompts
from sampling.generate import SAMPLERS, plain_passes, sample_codes, sampler_for
from sampling.speculative import SpeculativeConfig, SpeculativeStats


@dataclass
class SampleRunConfig:
    weights: str = "???"  # generator weights (.safetensors) exported by train_gen.py
    tokenizer: Optional[str] = None  # tokenizer weights; None: the path stored in the generator weights
    out: str = "???"  # grid mode: the .png to write; images mode: the output folder
    mode: str = "grid"  # grid: one row per class | images: num_images PNGs in shards + samples.npz
    num_images: int = 50000  # images mode: how many
    labels: str = "balanced"  # images mode: balanced (image i gets class i % classes, or prompt i % prompts) | random
    classes: Optional[List[int]] = None  # grid mode, class-conditional generators: one row per class id; None: all (at most 32)
    prompt: Optional[str] = None  # text-to-image: one prompt (a grid row; every image in images mode); takes precedence over prompts. "" (prompt='""' in a shell) is the empty caption, the null condition: unconditional samples, logged as such
    prompts: Optional[str] = None  # text-to-image: a file of prompts, one a line, or a captions.jsonl (grid: a row each; images: image i gets prompt i % count)
    text_encoder: Optional[str] = None  # text-to-image on encoder features: the encoder folder; None: the one recorded in the weights
    per_class: int = 8  # grid mode: images per row
    batch_size: int = 64  # images per process per forward pass (CFG doubles the rows)
    shard_size: int = 1000  # images mode: images per shard, the unit of resumption
    seed: int = 0  # noise seed; image i's noise depends only on (seed, i)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)  # guidance and filtering
    sampler: str = "plain"  # a name in sampling.generate.SAMPLERS: plain (one forward pass per step; flow models: one integration per step) | sjd | coupled (lossless) | gsd (lossy, faster): speculative decoding, sampling/speculative.py
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)  # window, draft init and gsd's group of the speculative samplers
    npz: bool = True  # images mode: pack OUT/samples.npz (arr_0 uint8 NHWC, arr_1 labels) at the end
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 where native: GPUs, CPUs with AVX512-BF16/AMX) | bf16 | fp32
    compile: bool = False  # compile model.extend into a CUDA graph (GPU; first batch is slow)

    def validate(self) -> None:
        check_fields(self, "", {"mode": ("grid", "images"), "num_images": ">= 1",
                                "labels": ("balanced", "random"), "per_class": ">= 1",
                                "batch_size": ">= 1", "shard_size": ">= 1",
                                "device": ("auto", "cpu", "cuda"),
                                "precision": PRECISIONS, "sampler": tuple(SAMPLERS)})
        self.speculative.validate()
        if self.classes is not None:
            self.check_classes()

    def check_classes(self) -> None:
        """classes= where it picks grid rows; elsewhere it would be ignored, so it is refused."""
        if not self.classes or min(self.classes) < 0:
            raise ConfigError(f"classes={self.classes}: class ids are >= 0 (None: all classes)")
        if self.prompt is not None or self.prompts is not None:
            key = "prompt" if self.prompt is not None else "prompts"
            raise ConfigError(f"classes={self.classes} and {key}= both given: class ids are the rows "
                              f"of a class-conditional generator, prompts those of a text-to-image "
                              f"one; give the one that fits the generator")
        if self.mode == "images":
            raise ConfigError(f"classes={self.classes} with mode=images: images mode draws every "
                              f"class (labels=balanced: image i gets class i % classes, or "
                              f"labels=random); classes= picks the rows of mode=grid: leave it out")

    def prompt_list(self) -> list[str] | None:
        """The prompts asked for, or None (class-conditional sampling)."""
        if self.prompt is not None:
            return [self.prompt.strip()]  # "" is the empty caption: unconditional samples
        return read_prompts(self.prompts) if self.prompts is not None else None


def load_models(cfg: SampleRunConfig, device: torch.device, log):
    model = load_generator(cfg.weights, device)
    if precision.use_bf16(cfg.precision, device):
        model = model.to(torch.bfloat16)
    spec = model.spec
    from tokenizer import load_tokenizer, tokenizer_sha256

    path = cfg.tokenizer or spec.tokenizer_path
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer weights {path} not found; pass tokenizer=PATH")
    tokenizer = load_tokenizer(path, device=device)
    check_tokenizer_fits(spec, tokenizer, path, cfg.weights)
    if tokenizer_sha256(path) != spec.tokenizer_sha256:
        msg = f"tokenizer {path} is not the one the generator was trained on (sha256 differs)"
        if cfg.tokenizer is None:
            raise ValueError(msg + "; pass tokenizer=PATH to use it anyway")
        log.warning(msg)
    return model, tokenizer


_CODES = {"discrete": "discrete codes", "multiscale": "per-scale codes", "continuous": "latents"}


def check_tokenizer_fits(spec, tokenizer, path, weights) -> None:
    """A tokenizer with another codebook or grid would decode garbage: refuse it, whatever
    the user asked for (another tokenizer of the same shape is only a warning)."""
    wanted = tokenizer_kind(spec.model)
    if tokenizer.kind != wanted:
        problems = [f"a {tokenizer.kind} tokenizer for a generator of {_CODES[wanted]}",
                    *tokenizer.grid_problems(spec)]
    else:
        problems = tokenizer.fit_problems(spec)
    if problems:
        raise ValueError(f"tokenizer {path} does not fit generator {weights}: {'; '.join(problems)}; "
                         f"pass the tokenizer the generator was trained on (tokenizer=PATH)")


def image_labels(cfg: SampleRunConfig, ids: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Each image's row of the condition table (its class, or its prompt's index)."""
    if cfg.labels == "balanced":
        return ids % num_rows
    return noise.randint(cfg.seed, ids, num_rows)


def condition_table(cfg: SampleRunConfig, model, device: torch.device, log):
    """(conditions, names): what images are drawn for, a row each, as the model's condition
    entry reads them (ar/conditioning). Grid mode: the prompts, or `classes`; images mode: the
    prompts, or every class."""
    rows = model.cond.grid_rows if cfg.mode == "grid" else model.cond.all_rows
    return rows(cfg.classes, cfg.prompt_list(), device, log=log, text_encoder=cfg.text_encoder)


def sample_grid(cfg: SampleRunConfig, model, tokenizer, device: torch.device, log) -> None:
    table, names = condition_table(cfg, model, device, log)
    cond = table.repeat_rows(cfg.per_class)
    ids = torch.arange(len(cond), device=device)
    codes, cost = [], SpeculativeStats()
    for lo in range(0, len(cond), cfg.batch_size):
        batch, stats = sample_codes(model, cond[lo:lo + cfg.batch_size], ids[lo:lo + cfg.batch_size],
                                    cfg.seed, cfg.sampling, cfg.sampler, cfg.speculative)
        codes.append(batch)
        cost.add(stats)
    images = decode_codes(tokenizer, torch.cat(codes))
    written = save_grid(images, cfg.per_class, cfg.out, names)
    done = "wrote" if written else "kept (the same grid, byte for byte)"
    log.info(f"{done} {cfg.out} ({len(names)} {model.cond.rows_name} x {cfg.per_class}){cost_line(cfg, model, cost)}")


def cost_line(cfg: SampleRunConfig, model, cost: SpeculativeStats) -> str:
    if not cost.images:
        return ""
    s = cost.summary()
    return (f"; sampler {cfg.sampler}: {s['forward_passes_per_image']:.1f} forward passes per image "
            f"(plain: {plain_passes(model)}), {s['mean_accepted_length']:.2f} tokens per pass")


def sampler_record(cfg: SampleRunConfig, model, cost: SpeculativeStats, seconds: float) -> dict:
    """What the sampler did, for the results JSON: the rule and its options, and per image the
    forward passes against plain sampling's and the tokens committed per pass."""
    record = {"sampler": cfg.sampler}
    if sampler_for(cfg.sampler, model).window:  # the options of the samplers that draft windows
        record["speculative"] = asdict(cfg.speculative)
    if cost.images:
        passes = plain_passes(model)
        s = cost.summary()
        record.update(s, plain_forward_passes_per_image=passes,
                      pass_reduction=round(passes / max(s["forward_passes_per_image"], 1e-9), 3))
    record["sampling_seconds"] = round(seconds, 2)
    return record


def check_out_folder(cfg: SampleRunConfig, out: Path, device: torch.device) -> None:
    """Refuse to mix shards made with other settings into one sample set. The precision is
    recorded as resolved on this device: "auto" gives other images on a GPU than on a CPU."""
    settings = {"weights_sha256": sha256_file(cfg.weights), "num_images": cfg.num_images,
                "labels": cfg.labels, "seed": cfg.seed, "shard_size": cfg.shard_size,
                "sampling": asdict(cfg.sampling), "sampler": cfg.sampler,
                "speculative": asdict(cfg.speculative), "prompts": cfg.prompt_list(),
                "precision": precision.resolved(cfg.precision, device)}
    path = out / "settings.json"
    if path.is_file():
        old = upgraded_settings(json.loads(path.read_text()), device)
        if old != settings:
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            raise ValueError(f"{out} holds samples made with other settings ({', '.join(diff)}); "
                             f"choose another out folder or delete it")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2))


def upgraded_settings(old: dict, device: torch.device) -> dict:
    """settings.json of earlier versions in today's terms, so their folders still resume:
    "auto" precision meant bf16 on GPUs only, and sampling keys added since take defaults."""
    if old.get("precision") == "auto":
        old["precision"] = "bf16" if device.type == "cuda" else "fp32"
    old["sampling"] = {**asdict(SamplingConfig()), **old.get("sampling", {})}
    old.setdefault("sampler", "plain")
    old.setdefault("prompts", None)
    old["speculative"] = {**asdict(SpeculativeConfig()), **old.get("speculative", {})}
    return old


def sample_images(cfg: SampleRunConfig, model, tokenizer, info: dist.DistInfo, log) -> None:
    out, n = Path(cfg.out), cfg.num_images
    if info.is_main:
        check_out_folder(cfg, out, info.device)
    dist.barrier()
    num_shards = -(-n // cfg.shard_size)
    if npz_done(out / "samples.npz", n) or (not cfg.npz and all(shard_done(out, k) for k in range(num_shards))):
        log.info(f"{out} already holds all {n} images; nothing to do")
        return
    mine = [k for k in range(num_shards) if k % info.world_size == info.rank and not shard_done(out, k)]
    extend_fn = compiled_extend() if cfg.compile else None
    table, names = condition_table(cfg, model, info.device, log)
    todo = sum(min(n, (k + 1) * cfg.shard_size) - k * cfg.shard_size for k in mine)
    bar = tqdm(total=todo, desc=f"images (rank {info.rank})", disable=not info.is_main)
    t0 = time.time()
    for k in mine:
        ids = torch.arange(k * cfg.shard_size, min(n, (k + 1) * cfg.shard_size), device=info.device)
        labels = image_labels(cfg, ids, len(names))
        images, cost, started = [], SpeculativeStats(), time.time()
        for l, i in zip(labels.split(cfg.batch_size), ids.split(cfg.batch_size)):
            codes, stats = sample_codes(model, table[l], i, cfg.seed, cfg.sampling,
                                        cfg.sampler, cfg.speculative, extend_fn)
            images.append(decode_codes(tokenizer, codes))
            cost.add(stats)
            bar.update(len(i))
        try:
            write_shard(out, k, ids.cpu().numpy(), np.concatenate(images), labels.cpu().numpy(),
                        cost={**asdict(cost), "seconds": time.time() - started})
        except DiskFullError as e:
            raise DiskFullError(e.path, "free space and run the same command again; finished "
                                        "shards are kept") from e
    bar.close()
    log.info(f"rank {info.rank}: {todo} images in {time.time() - t0:.1f}s")
    dist.barrier()
    if info.is_main:
        write_sampler_record(cfg, model, out, num_shards, log)
    if info.is_main and cfg.npz:
        prompts = names if model.cond.rows_name == "prompts" else None
        count, shape = pack_npz(out, num_shards, out / "samples.npz", expected=n, prompts=prompts)
        log.info(f"wrote {out / 'samples.npz'}: {count} images of {shape}")


def write_sampler_record(cfg: SampleRunConfig, model, out: Path, num_shards: int, log) -> None:
    """OUT/sampler.json from the shards' costs (shards of earlier versions have none)."""
    cost, seconds = SpeculativeStats(), 0.0
    for k in range(num_shards):
        shard = read_shard_cost(out, k)
        if shard is None:
            return
        seconds += shard.pop("seconds", 0.0)
        cost.add(SpeculativeStats(**shard))
    atomic_write_text(out / "sampler.json", json.dumps(sampler_record(cfg, model, cost, seconds), indent=2))
    log.info(f"wrote {out / 'sampler.json'}{cost_line(cfg, model, cost)}")


def run(cfg: SampleRunConfig) -> None:
    """One sampling run (every process of a torchrun calls it): a grid, or N images."""
    info = dist.init_distributed(cfg.device)
    log = dist.get_logger("sample", info.rank)
    model, tokenizer = load_models(cfg, info.device, log)
    sampler_for(cfg.sampler, model)  # a sampler that does not fit the model, refused before any work
    if cfg.mode == "grid":
        if info.is_main:
            sample_grid(cfg, model, tokenizer, info.device, log)
    else:
        sample_images(cfg, model, tokenizer, info, log)
    dist.barrier()
    dist.cleanup()
