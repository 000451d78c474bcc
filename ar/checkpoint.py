"""The two checkpoint kinds.

Resume state, `RUN/checkpoints/step_XXXXXXX/`: model, optimiser, EMA, step, samples consumed
(the data position), each rank's RNG state and unlogged loss window, and `identity.json`: what
the run trains on and the settings that define it (a resume with other data or settings is
refused, listing each difference). A checkpoint is assembled in a temporary folder and renamed
into place, then `RUN/checkpoints/LATEST` is replaced atomically: killing the run at any moment
leaves the previous checkpoint intact, and a failed write (a full disk) removes the temporary
folder. Our files are read with `torch.load(weights_only=True)`; under DeepSpeed the model and
optimiser go through the engine's own save/load API instead.

Exported weights, `RUN/weights/*.safetensors`: the EMA parameters plus the `GeneratorSpec`
YAML that rebuilds the model, the only thing sampling reads, loaded strictly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ar.config import GeneratorSpec, ModelConfig
from ar.model import ARModel
from common import dist
from common.config import from_yaml, recorded_differences, to_yaml, upgrade_legacy
from common.io import (DiskFullError, WriteRefusedError, atomic_write_text, load_state_strict,
                       read_weights, save_weights, translate_disk_full)

GENERATOR_KIND = "generator"


def _tag(step: int) -> str:
    return f"step_{step:07d}"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "LATEST"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is missing; delete {pointer} "
                                f"to start over or restore the folder")
    return path


def save_resume(run_dir: str | Path, step: int, samples: int, model, optimizer, ema,
                info: dist.DistInfo, keep: int, engine=None, identity: dict | None = None,
                rank_state: dict | None = None) -> Path:
    """Write a resumable checkpoint; every rank must call this (it synchronises them).

    `identity` (JSON) is stored for `check_identity`; `rank_state` holds this rank's own
    tensors that a resume must restore (e.g. the loss window not yet logged).
    """
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / _tag(step), root / f".{_tag(step)}.tmp"
    error = None
    try:  # errors name `final`: the temporary folder is ours, not a path the user knows
        with translate_disk_full(final):
            if info.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
    except (DiskFullError, WriteRefusedError) as e:
        error = e
    dist.barrier()
    try:
        with translate_disk_full(final):
            if error is None and tmp.is_dir():
                _write_resume_files(tmp, step, samples, model, optimizer, ema, info, engine,
                                    identity, rank_state)
    except (DiskFullError, WriteRefusedError) as e:
        error = e
    failed = torch.tensor([float(error is not None)], device=info.device)
    if dist.all_reduce_sum(failed).item() > 0:  # every rank gives up together
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise error or RuntimeError(f"another process could not write {final}; its error "
                                    f"names the cause")
    dist.barrier()
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for torn in root.glob(".*.tmp"):  # what a run killed mid-write left: a folder, LATEST's temp
            if torn.is_dir():
                shutil.rmtree(torn, ignore_errors=True)
            else:
                torn.unlink(missing_ok=True)
        atomic_write_text(root / "LATEST", final.name + "\n")
        old = sorted(p for p in root.glob("step_*") if p.is_dir())
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def _write_resume_files(tmp: Path, step: int, samples: int, model, optimizer, ema,
                        info: dist.DistInfo, engine, identity: dict | None,
                        rank_state: dict | None) -> None:
    """This rank's files of a checkpoint, into the temporary folder `tmp`."""
    state = {"cpu": torch.get_rng_state(), **(rank_state or {})}
    if info.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(info.device)
    torch.save(state, tmp / f"rng_rank{info.rank}.pt")
    if engine is not None:  # DeepSpeed writes model and optimiser shards itself, on all ranks
        engine.save_checkpoint(str(tmp), tag="engine", client_state={"step": step},
                               save_latest=False)
    if info.is_main:
        state = {"step": step, "samples": samples, "ema": ema.state_dict()}
        if engine is None:
            state["model"] = model.state_dict()
            state["optimizer"] = optimizer.state_dict()
        torch.save(state, tmp / "state.pt")
        (tmp / "identity.json").write_text(json.dumps(identity or {}, indent=1) + "\n")

def load_resume(path: Path, model, optimizer, ema, info: dist.DistInfo,
                engine=None) -> tuple[int, int, dict]:
    """Restore a checkpoint written by `save_resume`; returns (step, samples consumed, this
    rank's extra state, empty if the checkpoint has none for this rank)."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if engine is not None:
        loaded, _ = engine.load_checkpoint(str(path), tag="engine", load_module_strict=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load its checkpoint from {path}/engine")
    else:
        load_state_strict(model, state["model"], f"checkpoint {path}")
        optimizer.load_state_dict(state["optimizer"])
    ema.load_state_dict(state["ema"])
    rank_state = {}
    rng_file = path / f"rng_rank{info.rank}.pt"
    if rng_file.is_file():  # absent when resuming with more processes than before
        rank_state = torch.load(rng_file, map_location="cpu", weights_only=True)
        torch.set_rng_state(rank_state.pop("cpu"))
        cuda = rank_state.pop("cuda", None)
        if cuda is not None and info.device.type == "cuda":
            torch.cuda.set_rng_state(cuda, info.device)
    return int(state["step"]), int(state["samples"]), rank_state


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint folder holds, from its name (step_XXXXXXX)."""
    return int(path.name.split("_")[-1])


# what a difference in the recorded data means, for the refusal's message
IDENTITY_MEANINGS = {
    "data.fingerprint": "the cache holds other codes or labels than the run started on: another "
                        "dataset, or the images encoded anew",
    "data.tokenizer_sha256": "the cache was encoded with another tokenizer",
    "data.text.captions_sha256": "other captions",
}


def check_identity(path: Path, identity: dict, run_dir: str | Path) -> bool:
    """Refuse to resume a checkpoint made with other data or settings, listing each difference.

    Returns False (nothing to compare) for checkpoints written before identities were stored.
    """
    stored_file = path / "identity.json"
    if not stored_file.is_file():
        return False
    stored = json.loads(stored_file.read_text())
    if isinstance(stored.get("model"), dict):  # the model config as it was written then, in today's keys
        upgrade_legacy(ModelConfig, stored["model"])
    diffs = recorded_differences(stored, identity, IDENTITY_MEANINGS)
    if diffs:
        raise ValueError(f"{path} was made with other data or settings than this run "
                         f"({'; '.join(diffs)}). To start a new run, choose another out_dir= "
                         f"(or delete {Path(run_dir) / 'checkpoints'}); to continue this one, run "
                         f"it with the settings and data it was started with")
    return True


def finished_run(run: Path, step: int, max_steps: int) -> dict | None:
    """The summary of a run that already reached max_steps and exported its weights."""
    summary = run / "summary.json"
    if step < max_steps or not (run / "weights" / "ema.safetensors").is_file() \
            or not summary.is_file():
        return None
    try:
        done = json.loads(summary.read_text())
    except json.JSONDecodeError:
        return None
    return done if done.get("steps") == step else None


def check_resume(run: Path, identity: dict, max_steps: int, log) -> tuple[Path | None, dict | None]:
    """(latest checkpoint, summary if the run is already finished); refuses a checkpoint made
    with other data or settings, or one past max_steps."""
    ckpt = latest_checkpoint(run)
    if ckpt is None:
        return None, None
    if not check_identity(ckpt, identity, run):
        log.warning(f"{ckpt} records no data identity (an older checkpoint): resuming unchecked")
    if checkpoint_step(ckpt) > max_steps:
        raise ValueError(f"{ckpt} is past train.max_steps={max_steps}; raise "
                         f"train.max_steps or choose another out_dir=")
    return ckpt, finished_run(run, checkpoint_step(ckpt), max_steps)


def export_generator(path: str | Path, model: ARModel, run_config_yaml: str = "") -> Path:
    """Write a model's weights and its GeneratorSpec as a safetensors weights file."""
    return save_weights(path, model.state_dict(), GENERATOR_KIND, to_yaml(model.spec),
                        extra={"run_config": run_config_yaml} if run_config_yaml else None)


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> ARModel:
    """Build the generator described by a weights file and load it strictly, in eval mode."""
    tensors, config_yaml, _ = read_weights(path, GENERATOR_KIND)
    spec = from_yaml(GeneratorSpec, config_yaml, source=f"{path} (stored config)")
    with torch.device("meta"):  # no memory or time spent on an initialisation we overwrite
        model = ARModel(spec)
    load_state_strict(model, tensors, f"weights file {path}", assign=True)
    model.reset_buffers("cpu")
    return model.to(device).eval().requires_grad_(False)
