"""Fault injection on the flow, next-scale, text and token-shuffle pipelines, stage by stage, as
test_{encode,train,sample}_faults.py do for the token pipeline: kill -9 a stage at a random
moment after real work, run the same command again and get the uninterrupted run's files bit
for bit; run a finished stage again and it changes no file (bytes and mtimes) and says so.

One test body per stage and kind of fault, over the table PIPELINES. The uninterrupted runs
are made once per pipeline (`refs`): each stage's reference output is the next stage's input,
as in a real pipeline; the re-runs of finished stages run in this process (they only check
and say so: a fresh interpreter would spend 3-6 s importing for each). Sizes are the smallest
that leave work after the kill: 16 images in 8 encode shards, 12 training steps with a
checkpoint every 3, 16 samples in 8 shards."""

from __future__ import annotations

import functools
import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import ROOT, make_image_folder, tiny_kl
from faults import (assert_same_weights, killed_midway, latest_step, rerun_changes_nothing, run,
                    run_in_process, stamps, tree)
from test_next_scale import tiny_msvq
from test_text import _tiny_vq
from test_train import run_train, train_cmd

NUM_IMAGES, SHARD, NUM_SAMPLES = 16, 2, 16  # 8 encode shards, 8 sample shards
STEPS = ["train.max_steps=12", "train.ckpt_every=3", "train.keep_ckpts=2", "model.resid_dropout=0.1",
         "grid.per_class=1"]  # dropout: the resumed RNG state matters
FLOW = ["model.head=flow", "model.order.name=cell", "model.order.cell=2", "model.class_condition.tokens=0",
        "model.backbone.adaln=true", "model.pos_embed=learned", "grid.sampling.flow_steps=2"]
SPEED = ("samples_per_s", "tokens_per_s")  # the only logged values a resumed run may change


@dataclass(frozen=True)
class Pipeline:
    tokenizer: Callable[[Path], Path] | None = None  # makes the tokenizer; None: no encode stage
    resolution: int = 16
    encode: tuple = ()  # encode arguments
    captions: bool = False  # the images come with a captions.jsonl; samples are drawn for prompts
    cache_of: str = ""  # trains on another pipeline's cache
    train: tuple = ()  # train_gen.py arguments (model.*)
    sample: tuple = ()  # sample.py arguments


PIPELINES = {
    "flow": Pipeline(tiny_kl, train=tuple(FLOW), sample=("sampling.flow_steps=2",)),
    "scale": Pipeline(tiny_msvq, resolution=8, train=("model.order.name=scale",),
                      sample=("sampling.cfg_schedule=linear_full",)),
    "text": Pipeline(_tiny_vq, encode=("text.kind=bpe", "text.vocab_size=300"), captions=True,
                     train=("model.condition=text",)),
    # token-shuffle trains on plain VQ codes: the text pipeline's cache, class-conditioned
    "shuffle": Pipeline(cache_of="text",
                        train=("model.inputs.name=shuffle", "model.order.name=cell", "model.order.cell=2")),
}
ENCODED = [name for name, p in PIPELINES.items() if p.tokenizer is not None]


# ------------------------------------------------------------------------- commands and runs

def encode_cmd(name: str, refs, out: Path) -> list:
    p, (data, tok) = PIPELINES[name], refs.inputs(name)
    return [sys.executable, "-m", "tokenizer.encode", f"data.root={data}",
            f"data.resolution={p.resolution}", f"tokenizer={tok}", f"out={out}", "batch_size=2",
            f"shard_size={SHARD}", "num_workers=0", "device=cpu", *p.encode]


def train_args(name: str) -> list:
    return [*STEPS, *PIPELINES[name].train]


def sample_cmd(name: str, refs, out: Path) -> list:
    weights = refs.trained(name) / "weights" / "ema.safetensors"
    captioned = PIPELINES[name].captions  # the prompts file sits beside the images
    prompts = [f"prompts={refs.inputs(name)[0].parent / 'prompts.txt'}"] if captioned else []
    return [sys.executable, ROOT / "sample.py", f"weights={weights}", f"out={out}", "device=cpu",
            "batch_size=2", f"shard_size={SHARD}", "precision=fp32", "sampling.cfg_scale=2.0",
            "mode=images", f"num_images={NUM_SAMPLES}", *prompts, *PIPELINES[name].sample]


class References:
    """The uninterrupted run of each stage of each pipeline, made on first use."""

    def __init__(self, factory):
        self.factory = factory

    @functools.cache
    def inputs(self, name: str) -> tuple[Path, Path]:
        """(image folder, tokenizer weights); a text pipeline's images have captions, and a
        prompts file sits beside the folder."""
        p = PIPELINES[name]
        root = self.factory.mktemp(name)
        data = make_image_folder(root / "data", p.resolution, per_class=NUM_IMAGES // 2)
        if p.captions:
            lines = [json.dumps({"file": f"{c}/{i}.png", "caption": f"a {c} number {i}"})
                     for c in ("cat", "dog") for i in range(NUM_IMAGES // 2)]
            (data / "captions.jsonl").write_text("\n".join(lines) + "\n")
            (root / "prompts.txt").write_text("a cat number 1\na dog number 5\n")
        return data, p.tokenizer(root)

    @functools.cache
    def cache(self, name: str) -> Path:
        if PIPELINES[name].cache_of:
            return self.cache(PIPELINES[name].cache_of)
        out = self.factory.mktemp(f"{name}_cache") / "cache"
        run(encode_cmd(name, self, out))
        return out

    @functools.cache
    def trained(self, name: str) -> Path:
        out = self.factory.mktemp(f"{name}_train") / "run"
        run_train(out, self.cache(name), *train_args(name))
        return out

    @functools.cache
    def samples(self, name: str) -> Path:
        out = self.factory.mktemp(f"{name}_samples") / "samples"
        run(sample_cmd(name, self, out))
        return out


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> References:
    return References(tmp_path_factory)


# ------------------------------------------------------------------------- encode

def encode_progress(name: str, rng: random.Random) -> Callable[[Path], bool]:
    """When real work is on disk: a random number of finished shards (their data file is written
    last); for a captioned cache, whose image side is the token pipeline's, its caption side
    being written."""
    if PIPELINES[name].captions:
        return lambda out: (out / "text").is_dir()
    k = rng.randint(1, NUM_IMAGES // SHARD - 3)
    return lambda out: sum(not f.name.startswith("labels_") for f in out.glob("*_*.npy")) >= k


@pytest.mark.parametrize("name", ENCODED)
def test_encode_killed_then_rerun_gives_the_uninterrupted_cache(refs, tmp_path, name):
    reference, seed = refs.cache(name), random.randrange(1 << 30)
    complete = "text/meta.json" if PIPELINES[name].captions else "meta.json"
    out = killed_midway(tmp_path, seed, lambda out: encode_cmd(name, refs, out),
                        encode_progress(name, random.Random(seed)),
                        lambda out: (out / complete).exists(),
                        0.005 if PIPELINES[name].captions else 0.02)  # the caption side: ~10 ms
    finished = [f for f in out.glob("*_*.npy") if not f.name.startswith("labels_")]  # commit marks
    kept = stamps(finished)
    run(encode_cmd(name, refs, out))
    assert stamps(finished) == kept  # the shards finished before the kill were not redone
    assert tree(out) == tree(reference), f"kill seed {seed}"  # same bytes, no temp file left


@pytest.mark.parametrize("name", ENCODED)
def test_encode_rerun_of_a_finished_cache_changes_nothing_and_says_so(refs, tmp_path, name):
    said = rerun_changes_nothing(refs.cache(name), tmp_path / "cache",
                                 lambda out: encode_cmd(name, refs, out))
    shards = NUM_IMAGES // SHARD
    assert f"already complete: {NUM_IMAGES} images in {shards} shards; nothing to do" in said
    if PIPELINES[name].captions:
        assert f"caption cache {tmp_path / 'cache' / 'text'} already complete ({NUM_IMAGES} " \
               f"captions); nothing to do" in said


def test_encode_rerun_removes_the_caption_file_a_kill_tore(refs, tmp_path):
    out = tmp_path / "cache"
    shutil.copytree(refs.cache("text"), out)
    # what a kill in the middle of writing lengths.npy leaves: no text/meta.json yet (it is
    # written last) and the torn temp file of lengths.npy (common/io.py atomic_path's name)
    text = out / "text"
    (text / "meta.json").unlink()
    (text / ".lengths.npy.k1ll3d00.tmp").write_bytes((text / "lengths.npy").read_bytes()[:40])
    (text / "lengths.npy").unlink()
    said = run_in_process(encode_cmd("text", refs, out))
    assert f"wrote {NUM_IMAGES} captions" in said  # remade
    assert not list(text.glob(".*.tmp"))


# ------------------------------------------------------------------------- train

def assert_same_run(out: Path, reference: Path, seed: int) -> None:
    """The same files (tensorboard's aside: one per process) with the same exported weights,
    log, summary and final grid as the reference run."""
    names = [{k for k in tree(run_dir) if not k.startswith("tb/")} for run_dir in (out, reference)]
    assert names[0] == names[1], f"kill seed {seed}"  # no temp file or stale checkpoint left
    for name in sorted(k for k in names[0] if k.endswith(".safetensors")):
        assert_same_weights(out / name, reference / name)
    logged = [[{k: v for k, v in json.loads(line).items() if k not in SPEED}
               for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
              for run_dir in (out, reference)]
    assert logged[0] == logged[1], f"kill seed {seed}"
    summaries = [json.loads((run_dir / "summary.json").read_text()) for run_dir in (out, reference)]
    for s in summaries:
        s["final"] = {k: v for k, v in s["final"].items() if k not in SPEED}
    assert summaries[0] == summaries[1]
    assert (out / "grid_final.png").read_bytes() == (reference / "grid_final.png").read_bytes()


@pytest.mark.parametrize("name", PIPELINES)
def test_train_killed_then_resumed_gives_the_uninterrupted_run(refs, tmp_path, name):
    codes, reference, seed = refs.cache(name), refs.trained(name), random.randrange(1 << 30)
    out = killed_midway(tmp_path, seed, lambda out: train_cmd(out, codes, *train_args(name)),
                        lambda out: latest_step(out) >= 3, lambda out: (out / "summary.json").exists(),
                        0.1)  # after checkpoint 3 of 12: mid-step, mid-log or mid-checkpoint
    step = latest_step(out)
    said = run(train_cmd(out, codes, *train_args(name)))
    checkpoint = out / "checkpoints" / f"step_{step:07d}"
    assert f"resumed from {checkpoint} at step {step}" in said  # not started over
    assert_same_run(out, reference, seed)


@pytest.mark.parametrize("name", PIPELINES)
def test_train_rerun_of_a_finished_run_changes_nothing_and_says_so(refs, tmp_path, name):
    said = rerun_changes_nothing(refs.trained(name), tmp_path / "run",
                                 lambda out: train_cmd(out, refs.cache(name), *train_args(name)))
    assert "already finished at step 12" in said and "nothing to do" in said


# ------------------------------------------------------------------------- sample

def sample_files(out: Path) -> dict[str, bytes]:
    """The images and labels of every shard (not their timings)."""
    return {k: v for k, v in tree(out).items() if k.endswith((".png", "labels.json"))}


@pytest.mark.parametrize("name", PIPELINES)
def test_sample_killed_then_resumed_gives_the_same_images(refs, tmp_path, name):
    reference, seed = refs.samples(name), random.randrange(1 << 30)
    out = killed_midway(tmp_path, seed, lambda out: sample_cmd(name, refs, out),
                        lambda out: (out / "shard_00000" / "labels.json").is_file(),
                        lambda out: (out / "samples.npz").exists(), 0.05)
    finished = [f for shard in out.glob("shard_*") if (shard / "labels.json").is_file()
                for f in shard.iterdir()]
    kept = stamps(finished)
    run(sample_cmd(name, refs, out))
    assert stamps(finished) == kept  # the shards finished before the kill were not redone
    assert tree(out).keys() == tree(reference).keys()  # no temp file left by the torn shard
    assert sample_files(out) == sample_files(reference), f"kill seed {seed}"
    with np.load(out / "samples.npz") as a, np.load(reference / "samples.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        assert all(np.array_equal(a[k], b[k]) for k in a.files), f"kill seed {seed}"


@pytest.mark.parametrize("name", PIPELINES)
def test_sample_rerun_of_finished_images_changes_nothing_and_says_so(refs, tmp_path, name):
    said = rerun_changes_nothing(refs.samples(name), tmp_path / "samples",
                                 lambda out: sample_cmd(name, refs, out))
    assert f"already holds all {NUM_SAMPLES} images; nothing to do" in said
