"""The config schema of `train_gen.py`: one dataclass per component, every field commented.

YAML files under configs/ are deltas over these defaults. Values that follow from the data
(vocabulary size, grid, number of classes) are read from the code cache once and stored in
the weights file's `GeneratorSpec`; they are never set by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from ar.model import ModelConfig
from common.config import ConfigError, check_fields
from sampling.generate import SamplingConfig


@dataclass
class DataConfig:
    codes: str = "???"  # code cache folder written by `python -m tokenizer.encode`


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
    schedule: str = "constant"  # constant | cosine (after warm-up)
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    cond_dropout: float = 0.1  # probability a label is replaced by the null class (for CFG)
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
            "schedule": ("constant", "cosine"), "min_lr_ratio": "[0, 1]", "grad_clip": ">= 0",
            "cond_dropout": "[0, 1)", "ema_decay": "[0, 1]", "precision": ("auto", "bf16", "fp32"),
            "engine": ("ddp", "deepspeed"), "zero_stage": (1, 2), "device": ("auto", "cpu", "cuda"),
            "log_every": ">= 1", "ckpt_every": ">= 1", "keep_ckpts": ">= 0", "sample_every": ">= 0",
            "threads": ">= 0"})


@dataclass
class GridConfig:
    classes: Optional[List[int]] = None  # class ids, one grid row each; None: all (at most 16)
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
