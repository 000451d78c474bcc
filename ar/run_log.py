"""A training run's logs and exported files: the loss window between log lines (kept in
checkpoints, so a resumed run logs the same averages as an uninterrupted one), metrics.jsonl and
tensorboard scalars, and pruning of old weight exports."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from common import dist
from common.io import atomic_write_text, translate_disk_full


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


def log_metrics(run: Path, writer, metrics: dict) -> None:
    step = metrics["step"]
    for k, v in metrics.items():
        if k != "step":
            writer.add_scalar(f"train/{k}", v, step)
    writer.flush()
    path = run / "metrics.jsonl"
    with translate_disk_full(path), open(path, "a") as f:
        f.write(json.dumps(metrics) + "\n")


def truncate_metrics(path: Path, step: int, log) -> dict:
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


def prune_weights(folder: Path, keep: int) -> None:
    """Keep the newest `keep` step exports (0: all), and remove the temp files of exports a
    kill interrupted (only the main process writes here)."""
    for torn in folder.glob(".*.tmp"):
        torn.unlink(missing_ok=True)
    old = sorted(folder.glob("step_*.safetensors"))
    for p in old[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)
        p.with_suffix(".yaml").unlink(missing_ok=True)


def restore_window(rank_state: dict, device) -> tuple[dict, int]:
    """The unlogged window a checkpoint kept for this rank (older checkpoints: none)."""
    if "log_window" not in rank_state:
        return {}, 0
    names = rank_state.get("log_names", ["loss", "acc"])  # older checkpoints: the two
    window = dict(zip(names, rank_state["log_window"].to(device).unbind()))
    return window, int(rank_state["log_steps"])
