"""The whole pipeline on the built-in `shapes` dataset at 32x32, on a CPU, in minutes.

    make quickstart            (or: .venv/bin/python scripts/quickstart.py)

Each stage is the same command a user runs by hand (printed before it runs, and given in the
README, which a test keeps equal to STAGES), so this file is also the pipeline's shortest
documentation. Every stage skips or resumes finished work, so re-running after an interruption
continues, and re-running a finished pipeline changes no file and says so. Stage wall times go
to runs/quickstart/timings.json; the last step checks that the samples draw their class
(runs/quickstart/class_check.json).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: make the repository importable
    sys.path.insert(0, str(ROOT))

from common.io import atomic_write_text  # noqa: E402
RUN = "runs/quickstart"
DATA = "data/shapes32"
PY = sys.executable

STAGES = [
    ("dataset", [PY, "-m", "dataset.shapes", f"out={DATA}", "resolution=32",
                 "num_train=8000", "num_heldout=500", "seed=0"]),
    ("reference", [PY, "eval_fid.py", "mode=ref", f"images={DATA}/heldout", "resolution=32",
                   f"out={RUN}/heldout_ref.npz"]),
    ("tokenizer", [PY, "-m", "tokenizer.train", "--config", "configs/tokenizer/quickstart.yaml",
                   f"data.root={DATA}/train", f"data.eval_root={DATA}/heldout", f"out_dir={RUN}/vq",
                   "train.rfid=true", f"train.rfid_ref={RUN}/heldout_ref.npz"]),
    ("encode", [PY, "-m", "tokenizer.encode", f"data.root={DATA}/train", "data.resolution=32",
                f"tokenizer={RUN}/vq/vq.safetensors", f"out={RUN}/codes", "num_workers=0"]),
    ("generator", [PY, "train_gen.py", "--config", "configs/quickstart.yaml"]),
    ("grid", [PY, "sample.py", "--config", "configs/sample/quickstart.yaml",
              f"weights={RUN}/gen/weights/ema.safetensors", f"out={RUN}/grid.png", "mode=grid"]),
    ("samples", [PY, "sample.py", "--config", "configs/sample/quickstart.yaml",
                 f"weights={RUN}/gen/weights/ema.safetensors", f"out={RUN}/samples",
                 "mode=images", "num_images=500"]),
    ("fid", [PY, "eval_fid.py", f"images={RUN}/samples/samples.npz", f"ref={RUN}/heldout_ref.npz",
             f"out={RUN}/metrics.json", "num_expected=500", "metrics=[fid,sfid,pr,kid]"]),
]


def display(cmd: list[str]) -> str:
    """A stage's command as a person types it (and as the README gives it)."""
    return shlex.join(c.replace(PY, "python") for c in cmd)


def files_state() -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file the pipeline writes: a stage that changed none did no work."""
    state = {}
    for folder in (DATA, RUN):
        for dirpath, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(dirpath, name)
                if path != os.path.join(RUN, "timings.json"):
                    st = os.stat(path)
                    state[path] = (st.st_size, st.st_mtime_ns)
    return state


def class_check() -> dict:
    """How often a sample's nearest training image, in pixels, is of the sample's class.

    The shapes are discrete, so a clean sample is close to some training image; this measures
    what the grid shows (do the rows draw their class?) over all 500 samples.
    """
    import numpy as np

    from dataset.folder import ClassFolderDataset
    from dataset.images import load_image
    from evaluation.metrics import nearest_label_agreement

    train = ClassFolderDataset(f"{DATA}/train", 32)
    ref = np.stack([load_image(path, 32) for path, _ in train.samples])
    with np.load(f"{RUN}/samples/samples.npz") as z:
        out = nearest_label_agreement(z["arr_0"], z["arr_1"], ref, [y for _, y in train.samples])
    out["per_class"] = {train.classes[k]: v for k, v in out.pop("per_label").items()}
    atomic_write_text(Path(RUN, "class_check.json"), json.dumps(out, indent=2) + "\n")
    return out


def main() -> None:
    os.chdir(ROOT)
    timings, worked = {}, []
    t_all = time.time()
    for name, cmd in STAGES:
        print(f"\n=== {name}: {display(cmd)}", flush=True)
        t0, before = time.time(), files_state()
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"quickstart: stage '{name}' failed; fix the error above and re-run "
                     f"`make quickstart` (finished stages are skipped or resumed)")
        timings[name] = round(time.time() - t0, 1)
        if files_state() != before:
            worked.append(name)
        else:
            print(f"=== {name}: already complete, no file changed", flush=True)
    t0, before = time.time(), files_state()
    check = class_check()
    timings["class check"] = round(time.time() - t0, 1)
    timings["total"] = round(time.time() - t_all, 1)
    if files_state() != before:
        worked.append("class check")
    if worked:  # the timings of a run that did nothing would overwrite the real ones
        atomic_write_text(Path(RUN, "timings.json"), json.dumps(timings, indent=2) + "\n")
        print("\n=== quickstart finished (stages that did work: " + ", ".join(worked) + ")\n"
              + "\n".join(f"  {k:<10} {v:>7.1f} s" for k, v in timings.items()))
    else:
        print(f"\n=== quickstart: every stage was already complete; nothing changed "
              f"({RUN}/timings.json keeps the times of the run that did the work)")
    vq = json.loads(Path(RUN, "vq", "summary.json").read_text())
    gen = json.loads(Path(RUN, "gen", "summary.json").read_text())
    fid = json.loads(Path(RUN, "metrics.json").read_text())["metrics"]
    print(f"  tokenizer: PSNR {vq['psnr']:.2f} dB, rFID {vq.get('rfid', float('nan')):.2f}, "
          f"codebook usage {vq['usage_eval']:.0%}\n"
          f"  generator: final loss {gen['final']['loss']:.3f} after {gen['steps']} steps\n"
          f"  samples:   FID {fid['fid']:.2f} (500 samples vs 500 held-out images); "
          f"{check['agreement']:.0%} have a nearest training image of their own class "
          f"(chance {1 / len(check['per_class']):.1%}; {RUN}/class_check.json)\n"
          f"  grid:    {RUN}/grid.png  (one row per class)\n  samples: {RUN}/samples/samples.npz\n"
          f"  metrics: {RUN}/metrics.json")


if __name__ == "__main__":
    main()
