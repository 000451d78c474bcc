"""What a run trains on is part of its identity: a resume (or a finished run re-run) on other
images of the same count is refused, naming what differs; a broken cache file is named with
the command that repairs it, and that command (encode) re-checks and remakes it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, make_code_cache, make_image_folder, tiny_kl
from test_kl import kl_args
from test_msvq_train import train_args as msvq_args
from test_tokenizer import train_args as vq_args
from tokenizer import save_tokenizer
from tokenizer.encode import main as encode
from tokenizer.msvq import MSVQConfig, MSVQModel
from tokenizer.text_cache import TextCacheConfig, write_text_cache
from tokenizer.train import main as train_tokenizer

# (arguments of a tiny tokenizer run, image side) per tokenizer kind
TOKENIZERS = {"vq": (vq_args, 16), "kl": (kl_args, 16), "msvq": (msvq_args, 8)}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


def run(*args, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ tokenizer training

@pytest.mark.parametrize("kind", sorted(TOKENIZERS))
def test_a_tokenizer_run_refuses_other_images_of_the_same_count(kind, tmp_path):
    args, side = TOKENIZERS[kind]
    one = make_image_folder(tmp_path / "one", side, seed=0)
    two = make_image_folder(tmp_path / "two", side, seed=1)  # the same names, other images
    out = tmp_path / "run"
    train_tokenizer(args(one, out, steps=4))
    before = snapshot(out)
    # finished: pointed at other images it must not say "done" and keep the old weights
    with pytest.raises(ValueError, match=r"data.stamps_sha256: checkpoint '[0-9a-f]{12}\.\.\.'"):
        train_tokenizer(args(two, out, steps=4))
    # resumed further on other images: refused too, and nothing is touched
    with pytest.raises(ValueError, match="rewritten or replaced since the run started"):
        train_tokenizer(args(two, out, steps=6))
    assert snapshot(out) == before
    train_tokenizer(args(one, out, steps=6))  # its own images resume


def test_the_fingerprint_sees_added_files_and_content_mode_survives_a_copy(tmp_path):
    one = make_image_folder(tmp_path / "one", 16)
    out = tmp_path / "run"
    train_tokenizer(vq_args(one, out, steps=3, **{"data.fingerprint": "content"}))
    copy = tmp_path / "copy"
    shutil.copytree(one, copy, copy_function=shutil.copyfile)  # new modification times
    train_tokenizer(vq_args(copy, out, steps=4, **{"data.fingerprint": "content"}))
    (copy / "cat" / "9.png").write_bytes((copy / "cat" / "0.png").read_bytes())
    with pytest.raises(ValueError, match="data.files_sha256: .*files added, removed or renamed"):
        train_tokenizer(vq_args(copy, out, steps=5, **{"data.fingerprint": "content"}))
    with pytest.raises(ValueError, match="data.fingerprint: checkpoint 'content', now 'stat'"):
        train_tokenizer(vq_args(one, out, steps=5))


# ------------------------------------------------------------------ generator training

def encoded_pair(root: Path, tokenizer: Path, side: int) -> tuple[Path, Path]:
    """Caches of two image folders with the same names and count but other images."""
    caches = []
    for seed in (0, 1):
        data = make_image_folder(root / f"data{seed}", side, seed=seed)
        encode([f"data.root={data}", f"data.resolution={side}", f"tokenizer={tokenizer}",
                f"out={root / f'cache{seed}'}", "num_workers=0"])
        caches.append(root / f"cache{seed}")
    return caches[0], caches[1]


def scale_tokenizer(root: Path) -> Path:
    cfg = MSVQConfig(codebook_size=16, codebook_dim=4, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                     patch_nums=[1, 2, 4])
    torch.manual_seed(0)
    return save_tokenizer(MSVQModel(cfg), cfg, root / "msvq.safetensors")


@pytest.fixture(scope="module")
def flow_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    return encoded_pair(root, tiny_kl(root), 16)


@pytest.fixture(scope="module")
def scale_caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return encoded_pair(root, scale_tokenizer(root), 8)


def gen_args(kind: str) -> list[str]:
    from test_flow_pipeline import FLOW
    from test_next_scale import SCALE

    return FLOW if kind == "flow" else SCALE


@pytest.mark.parametrize("kind", ["flow", "scale"])
def test_a_generator_run_refuses_another_cache_of_the_same_count(kind, flow_caches, scale_caches,
                                                                 tmp_path):
    one, two = flow_caches if kind == "flow" else scale_caches
    assert json.loads((one / "meta.json").read_text())["fingerprint"] != \
        json.loads((two / "meta.json").read_text())["fingerprint"]
    out = tmp_path / "run"
    args = [f"out_dir={out}", *gen_args(kind)]
    run("train_gen.py", f"data.codes={one}", *args, "train.max_steps=3")
    before = snapshot(out)
    for steps in (3, 6):  # finished, then resumed further
        line = one_error_line(run("train_gen.py", f"data.codes={two}", *args,
                                  f"train.max_steps={steps}", ok=False))
        assert "data.fingerprint: checkpoint '" in line and "another dataset" in line
        assert "data.count" not in line  # the same number of images: only the content differs
    assert snapshot(out) == before
    run("train_gen.py", f"data.codes={one}", *args, "train.max_steps=6")


def test_caches_without_a_recorded_fingerprint_are_hashed_at_start(tmp_path):
    """make_code_cache writes meta.json without one (as caches of older versions): the codes
    are hashed when the run starts, so a changed code is still refused."""
    from test_train import run_train, train_cmd

    codes = make_code_cache(tmp_path / "codes", n=24)
    out = tmp_path / "run"
    run_train(out, codes, "train.max_steps=2", "train.ckpt_every=2")
    shard = np.load(codes / "codes_00000.npy")
    shard[0, 0, 0] = (shard[0, 0, 0] + 1) % 32
    np.save(codes / "codes_00000.npy", shard)
    proc = subprocess.run(train_cmd(out, codes, "train.max_steps=4", "train.ckpt_every=2"), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert "data.fingerprint" in one_error_line(proc)


# ------------------------------------------------------------------ broken cache files

def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


@pytest.mark.parametrize("kind, data_file", [("flow", "moments_00000.npy"),
                                             ("scale", "codes_00000.npy"),
                                             ("scale", "labels_00000.npy")])
def test_a_truncated_shard_is_named_and_a_rerun_of_encode_repairs_it(kind, data_file, flow_caches,
                                                                    scale_caches, tmp_path):
    one, _ = flow_caches if kind == "flow" else scale_caches
    cache = tmp_path / "cache"
    shutil.copytree(one, cache)
    intact = (cache / data_file).read_bytes()
    truncate(cache / data_file)
    line = one_error_line(run("train_gen.py", f"data.codes={cache}", f"out_dir={tmp_path / 'run'}",
                              *gen_args(kind), ok=False))
    assert f"{cache / data_file} is truncated or corrupt" in line and "re-run the encode" in line
    meta = json.loads((one / "meta.json").read_text())
    tok = meta["tokenizer"]["path"]
    side = {"flow": 16, "scale": 8}[kind]
    encode([f"data.root={meta['source']}", f"data.resolution={side}", f"tokenizer={tok}",
            f"out={cache}", "num_workers=0"])
    assert (cache / data_file).read_bytes() == intact
    run("train_gen.py", f"data.codes={cache}", f"out_dir={tmp_path / 'run'}", *gen_args(kind),
        "train.max_steps=2")


def captioned_cache(root: Path) -> Path:
    from test_text import _captioned_cache

    cache = _captioned_cache(root / "codes")
    write_text_cache(cache, TextCacheConfig(kind="bpe", vocab_size=300))
    return cache


@pytest.mark.parametrize("broken", ["tokens.npy", "lengths.npy", "null.npy", "tokenizer.json"])
def test_a_broken_caption_file_is_named_and_encode_remakes_it(broken, tmp_path):
    from ar.conditioning.captions import CaptionCache

    cache = captioned_cache(tmp_path)
    whole = {p.name: p.read_bytes() for p in (cache / "text").iterdir()}
    truncate(cache / "text" / broken)
    with pytest.raises(ValueError, match=rf"{broken} is missing, truncated or corrupt.*text.kind="):
        CaptionCache(cache, 24)
    write_text_cache(cache, TextCacheConfig(kind="bpe", vocab_size=300))  # the same settings
    assert {p.name: p.read_bytes() for p in (cache / "text").iterdir()} == whole
    CaptionCache(cache, 24)


def test_a_caption_file_of_another_shape_is_remade_too(tmp_path):
    cache = captioned_cache(tmp_path)
    tokens = cache / "text" / "tokens.npy"
    whole = tokens.read_bytes()
    np.save(tokens, np.load(tokens)[:10])  # a whole .npy, with too few rows
    write_text_cache(cache, TextCacheConfig(kind="bpe", vocab_size=300))
    assert tokens.read_bytes() == whole
