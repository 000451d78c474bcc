"""The whole pipeline on the built-in `shapes` dataset at 32x32, on a CPU, in minutes.

    make quickstart            (or: .venv/bin/python scripts/quickstart.py)
    make quickstart-flow       (or: .venv/bin/python scripts/quickstart.py flow)
    make quickstart-scale      (or: .venv/bin/python scripts/quickstart.py scale)
    make quickstart-t2i        (or: .venv/bin/python scripts/quickstart.py t2i)

`token` (the default): a VQ tokenizer and a next-token generator over its codes (LlamaGen's
method). `flow`: a KL VAE and a next-cell flow-matching generator over its latents (xAR's).
`scale`: a multi-scale residual VQ and a next-scale generator over its code pyramids (VAR's).
`t2i`: text-to-image: the VQ, the captions as BPE tokens, and a generator reading caption and
image tokens as one sequence (Token-Shuffle's design); its samples are drawn for the held-out
captions and scored for prompt following (evaluation/prompt_follow.py) as well as FID.

Each stage is the same command a user runs by hand (printed before it runs, and given in the
README and docs/ pages, which a test keeps equal to PIPELINES), so this file is also the pipeline's shortest
documentation. Every stage skips or resumes finished work, so re-running after an interruption
continues, and re-running a finished pipeline changes no file and says so. Stage wall times go
to RUN/timings.json; the last step of a class-conditional pipeline checks that the samples
draw their class (RUN/class_check.json).
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
DATA = "data/shapes32"
PY = sys.executable


def stages(run: str, tokenizer: str, weights: str, encoded: str, generator: str,
           data: str = DATA, resolution: int = 32, jitter: bool = False, text: bool = False) -> list:
    """The commands of one pipeline: `tokenizer` names its config and exported weights,
    `generator` its generator and sampling configs (configs/{generator}.yaml,
    configs/sample/{generator}.yaml); `data` the shapes folder at `resolution`; `text`: a
    text-to-image pipeline (captions cached as BPE tokens; samples for the held-out captions,
    scored for prompt following too)."""
    sample = [PY, "sample.py", "--config", f"configs/sample/{generator}.yaml",
              f"weights={run}/gen/weights/ema.safetensors"]
    held_out = [f"prompts={data}/heldout/captions.jsonl"] if text else []
    commands = [
        ("dataset", [PY, "-m", "dataset.shapes", f"out={data}", f"resolution={resolution}",
                     "num_train=8000", "num_heldout=500", "seed=0"] + (["jitter=true"] if jitter else [])),
        ("reference", [PY, "eval_fid.py", "mode=ref", f"images={data}/heldout", f"resolution={resolution}",
                       f"out={run}/heldout_ref.npz"]),
        # rFID (~45 s of Inception) for the image quickstarts; the text one reports PSNR and
        # spends its budget on the generator
        ("tokenizer", [PY, "-m", "tokenizer.train", "--config", f"configs/tokenizer/{tokenizer}.yaml",
                       f"data.root={data}/train", f"data.eval_root={data}/heldout",
                       f"out_dir={run}/{weights}"]
         + ([] if text else ["train.rfid=true", f"train.rfid_ref={run}/heldout_ref.npz"])),
        ("encode", [PY, "-m", "tokenizer.encode", f"data.root={data}/train", f"data.resolution={resolution}",
                    f"tokenizer={run}/{weights}/{weights}.safetensors", f"out={run}/{encoded}",
                    "num_workers=0"] + (["text.kind=bpe"] if text else [])),
        ("generator", [PY, "train_gen.py", "--config", f"configs/{generator}.yaml"]),
        ("grid", sample + [f"out={run}/grid.png", "mode=grid"]),
        ("samples", sample + [f"out={run}/samples", "mode=images", "num_images=500"] + held_out),
        ("fid", [PY, "eval_fid.py", f"images={run}/samples/samples.npz", f"ref={run}/heldout_ref.npz",
                 f"out={run}/metrics.json", "num_expected=500", "metrics=[fid,sfid,pr,kid]"]),
    ]
    if text:
        commands.append(("prompts", [PY, "-m", "evaluation.prompt_follow",
                                     f"npz={run}/samples/samples.npz", f"out={run}/prompt_following.json"]))
    return commands


# name -> (run folder, stages): token = VQ + next-token (LlamaGen), flow = KL VAE + next-cell flow
# (xAR), scale = multi-scale VQ + next-scale (VAR)
PIPELINES = {
    "token": ("runs/quickstart", stages("runs/quickstart", "quickstart", "vq", "codes", "quickstart")),
    "flow": ("runs/quickstart_flow", stages("runs/quickstart_flow", "kl_quickstart", "kl", "latents",
                                            "quickstart_flow")),
    "scale": ("runs/quickstart_scale", stages("runs/quickstart_scale", "msvq_quickstart", "msvq",
                                              "codes", "quickstart_scale")),
    "t2i": ("runs/quickstart_t2i", stages("runs/quickstart_t2i", "quickstart_t2i", "vq", "codes",
                                          "quickstart_t2i", text=True)),
    # not a quickstart: the speculative-decoding bench's harder model (256 tokens of jittered
    # 64 px shapes; about an hour on 2 CPU cores)
    "jitter64": ("runs/jitter64", stages("runs/jitter64", "vq_jitter64", "vq", "codes", "jitter64",
                                         data="data/shapes64j", resolution=64, jitter=True)),
}
QUICKSTARTS = ("token", "flow", "scale", "t2i")  # `make quickstart[-name]`; the others run as scripts
RUN, STAGES = PIPELINES["token"]


def stage_arg(pipeline: list, stage: str, key: str) -> str:
    """The value of `key=` (or of the option `key`) in one stage's command."""
    cmd = dict(pipeline)[stage]
    if key.startswith("--"):
        return cmd[cmd.index(key) + 1]
    return next(a.split("=", 1)[1] for a in cmd if a.startswith(f"{key}="))


def dataset_of(pipeline: list) -> tuple[str, int]:
    """(data folder, resolution) the pipeline's dataset stage writes."""
    return stage_arg(pipeline, "dataset", "out"), int(stage_arg(pipeline, "dataset", "resolution"))


def display(cmd: list[str]) -> str:
    """A stage's command as a person types it (and as the README and docs/ give it)."""
    return shlex.join(c.replace(PY, "python") for c in cmd)


def files_state(run: str, data: str) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file the pipeline writes: a stage that changed none did no work."""
    state = {}
    for folder in (data, run):
        for dirpath, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(dirpath, name)
                if path != os.path.join(run, "timings.json"):
                    st = os.stat(path)
                    state[path] = (st.st_size, st.st_mtime_ns)
    return state


def class_check(run: str, data: str = DATA, resolution: int = 32) -> dict:
    """The class check (evaluation/class_check.py) of the run's 500 samples -> RUN/class_check.json."""
    import numpy as np

    from evaluation.class_check import class_agreement

    with np.load(f"{run}/samples/samples.npz") as z:
        out = class_agreement(z["arr_0"], z["arr_1"], f"{data}/train", resolution)
    atomic_write_text(Path(run, "class_check.json"), json.dumps(out, indent=2) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    name = args[0] if args else "token"
    if name not in PIPELINES or len(args) > 1:
        sys.exit(f"usage: scripts/quickstart.py [{' | '.join(PIPELINES)}]")
    run, pipeline = PIPELINES[name]
    data, resolution = dataset_of(pipeline)
    again = (f"python scripts/quickstart.py {name}" if name not in QUICKSTARTS else
             "make quickstart" + ("" if name == "token" else f"-{name}"))
    os.chdir(ROOT)
    timings, worked = {}, []
    t_all = time.time()
    for stage, cmd in pipeline:
        print(f"\n=== {stage}: {display(cmd)}", flush=True)
        t0, before = time.time(), files_state(run, data)
        if subprocess.run(cmd).returncode != 0:
            sys.exit(f"quickstart: stage '{stage}' failed; fix the error above and re-run "
                     f"`{again}` (finished stages are skipped or resumed)")
        timings[stage] = round(time.time() - t0, 1)
        if files_state(run, data) != before:
            worked.append(stage)
        else:
            print(f"=== {stage}: already complete, no file changed", flush=True)
    text = "prompts" in dict(pipeline)  # text-to-image: scored for prompt following instead
    t0, before = time.time(), files_state(run, data)
    check = None if text else class_check(run, data, resolution)
    if check is not None:
        timings["class check"] = round(time.time() - t0, 1)
    timings["total"] = round(time.time() - t_all, 1)
    if check is not None and files_state(run, data) != before:
        worked.append("class check")
    if worked:  # the timings of a run that did nothing would overwrite the real ones
        atomic_write_text(Path(run, "timings.json"), json.dumps(timings, indent=2) + "\n")
        print("\n=== quickstart finished (stages that did work: " + ", ".join(worked) + ")\n"
              + "\n".join(f"  {k:<10} {v:>7.1f} s" for k, v in timings.items()))
    else:
        print(f"\n=== quickstart: every stage was already complete; nothing changed "
              f"({run}/timings.json keeps the times of the run that did the work)")
    print(summary(run, pipeline, check))


def summary(run: str, pipeline: list, check: dict | None) -> str:
    """What the pipeline made, in a few lines."""
    tok_dir = stage_arg(pipeline, "tokenizer", "out_dir")
    tok = json.loads(Path(tok_dir, "summary.json").read_text())
    gen = json.loads(Path(run, "gen", "summary.json").read_text())
    fid = json.loads(Path(run, "metrics.json").read_text())["metrics"]
    usage = (f"codebook usage {tok['usage_eval']:.0%}" if "usage_eval" in tok else
             f"latent scale {tok['latent_scale']:.3f}")
    if check is None:
        follow = json.loads(Path(run, "prompt_following.json").read_text())
        got, base = follow["prompt_following"], follow["shuffled_prompts"]
        verdict = (f"prompt following: all five attributes right {got['all_correct']:.0%} (shuffled "
                   f"prompts {base['all_correct']:.0%}); " + ", ".join(
                       f"{a} {got[a]:.0%}" for a in ("shape", "color", "size", "position", "background"))
                   + f" ({run}/prompt_following.json)")
        rows = "one row per prompt"
    else:
        verdict = (f"{check['agreement']:.0%} have a nearest training image of their own class "
                   f"(chance {1 / len(check['per_class']):.1%}; {run}/class_check.json)")
        rows = "one row per class"
    rfid = f"rFID {tok['rfid']:.2f}, " if "rfid" in tok else ""
    return (f"  tokenizer: PSNR {tok['psnr']:.2f} dB, {rfid}{usage}\n"
            f"  generator: final loss {gen['final']['loss']:.3f} after {gen['steps']} steps\n"
            f"  samples:   FID {fid['fid']:.2f} (500 samples vs 500 held-out images); {verdict}\n"
            f"  grid:    {run}/grid.png  ({rows})\n  samples: {run}/samples/samples.npz\n"
            f"  metrics: {run}/metrics.json")

if __name__ == "__main__":
    main()
