"""Tokenizer training's resume state: OUT_DIR/checkpoint.pt (model, discriminator, both
optimisers, step, RNG, a VQ's codebook-usage statistics (per scale for the msvq)) and the
identity it records, the training images and the settings that define the run, so that a
resume with others is refused.
Written atomically; read with torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from common.config import recorded_differences
from common.io import DiskFullError, atomic_torch_save

# settings that define a tokenizer run: a resume with any of them changed is refused
RESUME_KEYS = ("batch_size", "lr", "betas", "weight_decay", "warmup", "schedule", "min_lr_ratio",
               "grad_clip", "l1_weight", "gan", "disc_start", "disc_weight", "disc_layers", "disc_ch",
               "seed")
# ... and those of one tokenizer family (the others' settings are unused by it)
FAMILY_KEYS = {"vq": ("codebook_weight", "restart_dead"), "kl": ("kl_weight",),
               "msvq": ("codebook_weight", "restart_dead")}


# what a difference in the recorded images means, for the refusal's message
IDENTITY_MEANINGS = {
    "data.files_sha256": "other image files: another dataset, or files added, removed or renamed",
    "data.stamps_sha256": "the images have other sizes or modification times: rewritten or "
                          "replaced since the run started (cp -p and rsync -t keep the times of "
                          "a copied folder)",
    "data.content_sha256": "the images' bytes differ",
    "data.fingerprint": "pass the data.fingerprint= the run started with",
}


def run_identity(cfg, dataset) -> dict:
    """The training images (a fingerprint of data.root's files, data.fingerprint) and the
    settings that define the run, stored in the checkpoint."""
    return {"data": {"classes": list(dataset.classes), "resolution": cfg.data.resolution,
                     "fingerprint": cfg.data.fingerprint, **dataset.fingerprint(cfg.data.fingerprint)},
            "model": dataclasses.asdict(cfg.model),
            "train": {k: getattr(cfg.train, k)
                      for k in RESUME_KEYS + FAMILY_KEYS.get(cfg.model.name, ())}}


def check_identity(path, stored: dict | None, identity: dict) -> None:
    """Refuse to resume a checkpoint made with other images or settings, naming each one."""
    if stored is None:  # written before identities were stored
        return
    diffs = recorded_differences(stored, identity, IDENTITY_MEANINGS)
    if diffs:
        raise ValueError(f"{path} was made with other images or settings than this run "
                         f"({'; '.join(diffs)}). To start a new run, choose another out_dir= (or "
                         f"delete {path}); to continue this one, run it with its original settings")


def save_checkpoint(path, raw, disc, opt, opt_d, step, identity=None) -> None:
    q = getattr(raw, "quantize", None)  # a VQ's usage statistics; a KL VAE has none
    atomic_torch_save({
        "model": raw.state_dict(), "optimizer": opt.state_dict(),
        "discriminator": disc.state_dict() if disc is not None else {},
        "disc_optimizer": opt_d.state_dict() if opt_d is not None else {},
        "step": step, "rng": torch.get_rng_state(),
        "usage": ({"last_used": q.last_used.cpu(), "track_step": q.track_step.cpu()}
                  if q is not None else {}),
        "identity": identity,
    }, path)


def load_checkpoint(path, raw, disc, opt, opt_d, identity=None) -> int:
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    check_identity(path, ckpt.get("identity"), identity or {})
    raw.load_state_dict(ckpt["model"], strict=True)
    opt.load_state_dict(ckpt["optimizer"])
    if disc is not None and ckpt["discriminator"]:
        disc.load_state_dict(ckpt["discriminator"])
        opt_d.load_state_dict(ckpt["disc_optimizer"])
    if ckpt["usage"]:
        raw.quantize.last_used.copy_(ckpt["usage"]["last_used"])
        raw.quantize.track_step.copy_(ckpt["usage"]["track_step"])
    torch.set_rng_state(ckpt["rng"])
    return int(ckpt["step"])


@contextlib.contextmanager
def disk_full_advice(saved: int):
    """Name the checkpoint a re-run will resume from when a write fails on a full disk."""
    try:
        yield
    except DiskFullError as e:
        last = f"step {saved}" if saved else "none yet (the run starts over)"
        raise DiskFullError(e.path, f"free space and run the same command again; the last "
                                    f"complete checkpoint is {last}") from e
