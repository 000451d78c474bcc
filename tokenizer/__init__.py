"""Image tokenizers: a registry by name, and their exported weights (safetensors + config).

A tokenizer weights file is written by `save_tokenizer` and holds the tensors plus the resolved
config YAML; the config's `name` picks the class in `TOKENIZERS`, so a file rebuilds its own
module with no other input. Where a path is taken, a local diffusers AutoencoderKL folder
(config.json + weights) is accepted too and becomes a KL tokenizer (tokenizer/kl.py).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.config import ConfigError, from_yaml, to_yaml
from common.io import load_state_strict, read_weights, save_weights, sha256_file
from tokenizer.base import ImageTokenizer
from tokenizer.kl import (KLConfig, KLModel, diffusers_weights_file, load_diffusers_folder,
                          read_diffusers_config)
from tokenizer.msvq import MSVQConfig, MSVQModel
from tokenizer.vq import VQConfig, VQModel

# name -> module class, and name -> config dataclass
TOKENIZERS = {"vq": VQModel, "kl": KLModel, "msvq": MSVQModel}
CONFIGS = {"vq": VQConfig, "kl": KLConfig, "msvq": MSVQConfig}

WEIGHTS_KIND = "tokenizer"


def build_tokenizer(cfg) -> ImageTokenizer:
    if cfg.name not in TOKENIZERS:
        raise ConfigError(f"unknown tokenizer name {cfg.name!r}; known: {sorted(TOKENIZERS)}")
    return TOKENIZERS[cfg.name](cfg)


def save_tokenizer(model: ImageTokenizer, cfg, path: str | Path) -> Path:
    """Export weights (persistent state only) with the config that rebuilds the module."""
    if cfg.name not in TOKENIZERS:
        raise ConfigError(f"unknown tokenizer name {cfg.name!r}; known: {sorted(TOKENIZERS)}")
    return save_weights(path, model.state_dict(), kind=WEIGHTS_KIND, config_yaml=to_yaml(cfg))


def read_tokenizer_config(path: str | Path):
    """The config object stored in a tokenizer weights file (reads only the header)."""
    if Path(path).is_dir():
        return read_diffusers_config(path)
    _, text, _ = read_weights(path, kind=WEIGHTS_KIND)
    return _parse_config(text, path)


def _parse_config(text: str, path) -> object:
    try:
        stored = OmegaConf.create(text)
        name = stored.get("name") if isinstance(stored, DictConfig) else None
    except Exception:  # not YAML at all
        name = None
    if name not in CONFIGS:
        raise ValueError(f"{path}: its stored config names tokenizer {name!r}, which this version "
                         f"of argen does not know (known: {sorted(CONFIGS)})")
    return from_yaml(CONFIGS[name], text, source=f"{path} (stored config)")


def load_tokenizer(path: str | Path, device="cpu") -> ImageTokenizer:
    """Rebuild a frozen tokenizer from its weights file (or a diffusers AutoencoderKL folder):
    strict keys, eval mode, no grads."""
    if Path(path).is_dir():
        return load_diffusers_folder(path, device)
    tensors, text, _ = read_weights(path, kind=WEIGHTS_KIND)
    cfg = _parse_config(text, path)
    model = build_tokenizer(cfg)
    load_state_strict(model, tensors, source=str(path))
    model.eval().requires_grad_(False)
    return model.to(device)


def tokenizer_sha256(path: str | Path) -> str:
    """What identifies a tokenizer's weights: the file's sha256; for a diffusers folder, the
    sha256 of its config.json and weights file together."""
    path = Path(path)
    if not path.is_dir():
        return sha256_file(path)
    parts = [sha256_file(path / "config.json"), sha256_file(diffusers_weights_file(path))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
