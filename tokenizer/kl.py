"""Continuous (KL) image tokenizer: a VAE on diffusers' AutoencoderKL.

The network is diffusers' own AutoencoderKL (encoder, decoder, quant_conv, post_quant_conv),
so our weights carry diffusers' parameter names and a diffusers VAE folder loads by name. What
this file adds is the tokenizer contract (tokenizer/base.py) and the latent scale:
  - `moments(images)`: the posterior parameters (B, 2C, h, w), mean then log-variance, as the
    encoder's quant_conv gives them (unclamped; what MAR caches and what our cache stores);
  - `encode(images)`: scaled posterior means (mean - latent_shift) * latent_scale;
  - `decode(latents)`: takes *scaled* latents and undoes the scale itself.
The scale belongs to the tokenizer's config (0.2325 for MAR's KL-16), never to call sites.

Architecture and conventions follow the LDM KL autoencoder as MAR uses it (LTH14/mar
models/vae.py: posterior = quant_conv output split into mean and logvar, logvar clamped to
[-30, 20]; generators train on sample * 0.2325 and decode tokens / 0.2325). `KLConfig()` is
MAR's KL-16; convert/mar_vae.py maps its checkpoint onto this module.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.config import ConfigError, check_fields
from common.io import load_state_strict
from tokenizer.base import ImageTokenizer
from tokenizer.kl_loss import split_moments


@dataclass
class KLConfig:
    name: str = "kl"  # tokenizer family; picks the class when the weights are loaded
    block_out_channels: list[int] = field(default_factory=lambda: [128, 128, 256, 256, 512])  # channels per level (0: full resolution); len-1 downsamplings
    layers_per_block: int = 2  # res blocks per encoder level (each decoder level has one more)
    latent_channels: int = 16  # channels C of a latent position (the encoder outputs 2C: mean, logvar)
    norm_num_groups: int = 32  # GroupNorm groups; must divide every level's channels
    encoder_attention: list[int] = field(default_factory=lambda: [4])  # encoder levels with attention after each res block (KL-16: 16x16)
    decoder_attention: list[int] = field(default_factory=list)  # decoder levels with attention (MAR: none)
    mid_attention: bool = True  # self-attention in the middle blocks of encoder and decoder
    quant_conv: bool = True  # 1x1 conv on the encoder's moments (LDM, MAR; SD3/Flux VAEs: false)
    post_quant_conv: bool = True  # 1x1 conv on latents before the decoder
    # the generator sees (posterior - latent_shift) * latent_scale; LDM/MAR pick the scale as
    # 1/std of the latents (MAR KL-16: 0.2325); 0 in a training config: measured at its end
    latent_scale: float = 0.2325  # latent multiplier (diffusers' scaling_factor); 0: measured by training
    latent_shift: float = 0.0  # subtracted before scaling (diffusers' shift_factor; SD3/Flux); LDM/MAR: 0

    def validate(self) -> None:
        levels = len(self.block_out_channels)
        if levels == 0:
            raise ConfigError("model.block_out_channels must list at least one level")
        check_fields(self, "model.", {"layers_per_block": ">= 1", "latent_channels": ">= 1",
                                      "norm_num_groups": ">= 1", "latent_scale": ">= 0"})
        bad = [c for c in self.block_out_channels if c < 1 or c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"model.block_out_channels={self.block_out_channels}: {bad} not a "
                              f"positive multiple of model.norm_num_groups={self.norm_num_groups}")
        for key in ("encoder_attention", "decoder_attention"):
            wrong = [i for i in getattr(self, key) if not 0 <= i < levels]
            if wrong:
                raise ConfigError(f"model.{key}={getattr(self, key)}: levels {wrong} do not exist; "
                                  f"levels are 0..{levels - 1} (0 = full resolution)")
        if not math.isfinite(self.latent_shift):
            raise ConfigError(f"model.latent_shift={self.latent_shift} must be a finite number")


# ---------------------------------------------------------------- diffusers configuration

def diffusers_kwargs(cfg: KLConfig) -> dict:
    """AutoencoderKL's constructor arguments for `cfg`. diffusers lists decoder blocks from the
    lowest resolution up, so decoder level i is up block L-1-i."""
    levels = len(cfg.block_out_channels)
    down = ["AttnDownEncoderBlock2D" if i in cfg.encoder_attention else "DownEncoderBlock2D"
            for i in range(levels)]
    up = ["AttnUpDecoderBlock2D" if levels - 1 - j in cfg.decoder_attention else "UpDecoderBlock2D"
          for j in range(levels)]
    return dict(in_channels=3, out_channels=3, down_block_types=down, up_block_types=up,
                block_out_channels=list(cfg.block_out_channels),
                layers_per_block=cfg.layers_per_block, act_fn="silu",
                latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                scaling_factor=cfg.latent_scale, shift_factor=cfg.latent_shift or None,
                use_quant_conv=cfg.quant_conv, use_post_quant_conv=cfg.post_quant_conv,
                mid_block_add_attention=cfg.mid_attention)


_BLOCK_TYPES = {"down_block_types": ("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
                "up_block_types": ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")}


def config_from_diffusers(d: dict, source: str) -> KLConfig:
    """The KLConfig of a diffusers AutoencoderKL config.json; anything it cannot express is
    refused by name (a loader that ignored it would decode wrong images silently)."""
    found = d.get("_class_name")
    if found != "AutoencoderKL":
        raise ValueError(f"{source}: not a KL autoencoder: config.json has _class_name: {found}; "
                         f"pass the folder of a diffusers AutoencoderKL (in a pipeline, its vae/ "
                         f"sub-folder)")
    unsupported = {k: d.get(k) for k, ok in (("in_channels", 3), ("out_channels", 3),
                                             ("act_fn", "silu"), ("latents_mean", None),
                                             ("latents_std", None)) if d.get(k, ok) != ok}
    levels = len(d.get("block_out_channels", ()))
    for key, allowed in _BLOCK_TYPES.items():
        types = list(d.get(key, ()))
        if len(types) != levels or any(t not in allowed for t in types):
            unsupported[key] = types
    if unsupported:
        raise ValueError(f"{source}: AutoencoderKL settings argen's KL tokenizer does not support: "
                         f"{unsupported} (supported: 3-channel images, silu, no per-channel "
                         f"latents_mean/std, blocks {sorted(sum(_BLOCK_TYPES.values(), ()))})")
    downs, ups = d["down_block_types"], d["up_block_types"]
    cfg = KLConfig(block_out_channels=list(d["block_out_channels"]),
                   layers_per_block=int(d.get("layers_per_block", 1)),
                   latent_channels=int(d.get("latent_channels", 4)),
                   norm_num_groups=int(d.get("norm_num_groups", 32)),
                   encoder_attention=[i for i, t in enumerate(downs) if t.startswith("Attn")],
                   decoder_attention=sorted(levels - 1 - j for j, t in enumerate(ups)
                                            if t.startswith("Attn")),
                   mid_attention=bool(d.get("mid_block_add_attention", True)),
                   quant_conv=bool(d.get("use_quant_conv", True)),
                   post_quant_conv=bool(d.get("use_post_quant_conv", True)),
                   latent_scale=float(d.get("scaling_factor", 0.18215)),
                   latent_shift=float(d.get("shift_factor") or 0.0))
    try:
        cfg.validate()
    except ConfigError as e:
        raise ValueError(f"{source}: {e}") from None
    return cfg


# ---------------------------------------------------------------- model

class KLModel(ImageTokenizer):
    kind = "continuous"

    def __init__(self, cfg: KLConfig):
        super().__init__()
        from diffusers import AutoencoderKL  # imported here: a slow import the VQ path never needs

        self.cfg = cfg
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = cfg.latent_channels
        vae = AutoencoderKL(**diffusers_kwargs(cfg))
        # diffusers' modules as our own children: the state dict keeps diffusers' names
        self.encoder, self.decoder = vae.encoder, vae.decoder
        self.quant_conv = vae.quant_conv if cfg.quant_conv else nn.Identity()
        self.post_quant_conv = vae.post_quant_conv if cfg.post_quant_conv else nn.Identity()
        self.initialize_weights()

    def size_problems(self, spec) -> list[str]:
        if self.latent_channels != spec.latent_channels:
            return [f"{self.latent_channels} latent channels vs the generator's {spec.latent_channels}"]
        return []

    def initialize_weights(self) -> None:
        from diffusers.models.attention_processor import Attention
        from diffusers.models.resnet import ResnetBlock2D

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5))  # PyTorch's default, made explicit
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # zero the residual branches' last layer so every block starts as the identity (as our VQ)
        for m in self.modules():
            if isinstance(m, ResnetBlock2D):
                nn.init.zeros_(m.conv2.weight)
            elif isinstance(m, Attention):
                nn.init.zeros_(m.to_out[0].weight)

    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> posterior parameters (B, 2C, h, w): mean, then logvar."""
        return self.quant_conv(self.encoder(images))

    def posterior(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior mean and clamped logvar, each (B, C, h, w)."""
        return split_moments(self.moments(images))

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, C, h, w) -> images (B, 3, H, W)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, images: torch.Tensor, noise: torch.Tensor):
        """Training forward: (reconstruction of a posterior sample, mean, logvar)."""
        mean, logvar = self.posterior(images)
        return self.decode_raw(mean + torch.exp(0.5 * logvar) * noise), mean, logvar

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Images decoded from their posterior means (how reconstructions are reported)."""
        return self.decode_raw(self.posterior(images)[0])

    def _scale(self) -> float:
        if self.cfg.latent_scale <= 0:
            raise ValueError("this KL tokenizer has latent_scale 0 (to be measured by training); "
                             "export it with `python -m tokenizer.train`, which stores the measured "
                             "scale, or set model.latent_scale")
        return self.cfg.latent_scale

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> scaled posterior means (B, C, h, w)."""
        return (self.posterior(images)[0] - self.cfg.latent_shift) * self._scale()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w), as the generator makes them -> images (B, 3, H, W)."""
        return self.decode_raw(latents / self._scale() + self.cfg.latent_shift)


# ---------------------------------------------------------------- diffusers folders

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
# attention parameter names of diffusers before 0.14 (still in some hub folders) -> current
DEPRECATED_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def read_diffusers_config(folder: str | Path) -> KLConfig:
    folder = Path(folder)
    path = folder / "config.json"
    if not path.is_file():
        hint = (f"; it looks like a pipeline folder: pass {folder / 'vae'}"
                if (folder / "vae" / "config.json").is_file() else
                "; pass argen tokenizer weights (.safetensors) or a diffusers AutoencoderKL folder")
        raise FileNotFoundError(f"{folder} has no config.json{hint}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return config_from_diffusers(d, str(folder))


def diffusers_weights_file(folder: str | Path) -> Path:
    folder = Path(folder)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"{folder}: no weights file; expected one of {list(WEIGHT_FILES)}, "
                            f"found {present[:10]}")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no code


def _current_name(key: str) -> str:
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in DEPRECATED_ATTENTION and "attentions" in parts:
        parts[-2] = DEPRECATED_ATTENTION[parts[-2]]
    return ".".join(parts)


def load_diffusers_folder(folder: str | Path, device="cpu") -> KLModel:
    """A frozen KLModel from a local diffusers AutoencoderKL folder (config.json + weights);
    latent_scale is the folder's scaling_factor. Strict keys; fp16 weights become float32."""
    cfg = read_diffusers_config(folder)
    path = diffusers_weights_file(folder)
    tensors = {_current_name(k): v for k, v in _read_weights(path).items()}
    with torch.device("meta"):  # shapes only: the folder's tensors are copied in below
        model = KLModel(cfg)
    model.to_empty(device="cpu")
    load_state_strict(model, tensors, source=str(path))
    return model.eval().requires_grad_(False).to(device)
