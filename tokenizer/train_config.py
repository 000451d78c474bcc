"""The settings of tokenizer training (tokenizer/train.py): one schema per tokenizer family,
which share the data and training sections and differ in the model's, and the pick of the
schema from the command line (model.name)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from omegaconf import OmegaConf

from common.config import ConfigError, check_fields
from dataset.folder import FINGERPRINTS
from tokenizer.kl import KLConfig
from tokenizer.msvq import MSVQConfig
from tokenizer.vq import VQConfig


@dataclass
class DataConfig:
    root: str = "???"  # class-folder dataset root (root/<class>/<images>)
    resolution: int = 256  # training images are center-cropped to this side
    eval_root: str = ""  # images for the final PSNR/usage and grid; empty: use data.root
    in_memory: bool = False  # decode every image once into RAM (small datasets: much faster on CPU)
    fingerprint: str = "stat"  # what a resume checks the images by: stat (names, sizes, modification times) | content (every file's bytes; reads the dataset)

    def validate(self) -> None:
        check_fields(self, "data.", {"resolution": ">= 1", "fingerprint": FINGERPRINTS})


@dataclass
class TrainConfig:
    batch_size: int = 128  # global batch, split evenly over ranks
    steps: int = 100000  # optimizer steps in total
    lr: float = 1e-4  # peak AdamW learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])  # AdamW betas
    weight_decay: float = 0.05  # AdamW weight decay
    warmup: int = 0  # linear learning-rate warm-up steps
    schedule: str = "constant"  # after warm-up: "constant", or a "cosine" or "linear" decay to min_lr_ratio x lr
    min_lr_ratio: float = 0.1  # cosine, linear: the decay's floor as a fraction of lr
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    l1_weight: float = 0.0  # weight of an extra L1 reconstruction loss (L2 always has weight 1)
    codebook_weight: float = 1.0  # VQ, msvq: weight of codebook + commitment losses
    restart_dead: int = 0  # VQ, msvq: re-seed codes unused (at every scale) for this many batches from encoder outputs; 0: off
    usage_window: int = 100  # VQ, msvq: batches over which codebook usage is reported
    kl_weight: float = 1e-6  # KL: weight of the KL term (summed over an image's latent elements, batch mean; LDM)
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
            "warmup": ">= 0", "schedule": ("constant", "cosine", "linear"), "min_lr_ratio": "[0, 1]",
            "grad_clip": ">= 0", "l1_weight": ">= 0", "codebook_weight": ">= 0", "restart_dead": ">= 0",
            "kl_weight": ">= 0",
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


@dataclass
class KLTokenizerTrainConfig(TokenizerTrainConfig):
    model: KLConfig = field(default_factory=KLConfig)  # tokenizer architecture


@dataclass
class MSVQTokenizerTrainConfig(TokenizerTrainConfig):
    model: MSVQConfig = field(default_factory=MSVQConfig)  # tokenizer architecture


SCHEMAS = {"vq": TokenizerTrainConfig, "kl": KLTokenizerTrainConfig, "msvq": MSVQTokenizerTrainConfig}


def schema_for(argv) -> type:
    """The schema the command line asks for: model.name from the config files, then overrides
    (applied in that order, as parse_cli merges them). Unknown names get the VQ schema, and
    build_tokenizer then names the known ones."""
    args = list(sys.argv[1:] if argv is None else argv)
    files = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    files += [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    name = "vq"
    for path in files:
        try:
            name = OmegaConf.select(OmegaConf.load(path), "model.name", default=name)
        except Exception:  # missing or broken files are reported by parse_cli
            pass
    for a in args:
        if a.startswith("model.name="):
            name = a.split("=", 1)[1]
    return SCHEMAS.get(name, TokenizerTrainConfig)
