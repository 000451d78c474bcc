"""The two checkpoint kinds.

Resume state, `RUN/checkpoints/step_XXXXXXX/`: model, optimiser, EMA, step, samples consumed
(the data position) and each rank's RNG state. A checkpoint is assembled in a temporary
folder and renamed into place, then `RUN/checkpoints/LATEST` is replaced atomically: killing
the run at any moment leaves the previous checkpoint intact. Our files are read with
`torch.load(weights_only=True)`; under DeepSpeed the model and optimiser go through the
engine's own save/load API instead.

Exported weights, `RUN/weights/*.safetensors`: the EMA parameters plus the `GeneratorSpec`
YAML that rebuilds the model, the only thing sampling reads, loaded strictly.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ar import dist
from ar.config import from_yaml, to_yaml
from ar.io import atomic_torch_save, atomic_write_text, load_state_strict, read_weights, save_weights
from ar.model import ARModel, GeneratorSpec

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
                info: dist.DistInfo, keep: int, engine=None) -> Path:
    """Write a resumable checkpoint; every rank must call this (it synchronises them)."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / _tag(step), root / f".{_tag(step)}.tmp"
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    rng = {"cpu": torch.get_rng_state()}
    if info.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(info.device)
    torch.save(rng, tmp / f"rng_rank{info.rank}.pt")
    if engine is not None:  # DeepSpeed writes model and optimiser shards itself, on all ranks
        engine.save_checkpoint(str(tmp), tag="engine", client_state={"step": step},
                               save_latest=False)
    if info.is_main:
        state = {"step": step, "samples": samples, "ema": ema.state_dict()}
        if engine is None:
            state["model"] = model.state_dict()
            state["optimizer"] = optimizer.state_dict()
        torch.save(state, tmp / "state.pt")
    dist.barrier()
    if info.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        atomic_write_text(root / "LATEST", final.name + "\n")
        old = sorted(p for p in root.glob("step_*") if p.is_dir())
        for p in old[:-keep] if keep > 0 else []:
            shutil.rmtree(p, ignore_errors=True)
    dist.barrier()
    return final


def load_resume(path: Path, model, optimizer, ema, info: dist.DistInfo, engine=None) -> tuple[int, int]:
    """Restore a checkpoint written by `save_resume`; returns (step, samples consumed)."""
    state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    if engine is not None:
        loaded, _ = engine.load_checkpoint(str(path), tag="engine", load_module_strict=True)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load its checkpoint from {path}/engine")
    else:
        load_state_strict(model, state["model"], f"checkpoint {path}")
        optimizer.load_state_dict(state["optimizer"])
    ema.load_state_dict(state["ema"])
    rng_file = path / f"rng_rank{info.rank}.pt"
    if rng_file.is_file():  # absent when resuming with more processes than before
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and info.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], info.device)
    return int(state["step"]), int(state["samples"])


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
