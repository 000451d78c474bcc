"""The flow pipeline end to end with the real commands: a KL tokenizer's latent cache ->
train_gen.py with the flow head -> sample.py grid and images; and the kind mismatches a user
can make (latents for a token model, codes for a flow model, a VQ to decode latents)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ar.checkpoint import load_generator
from conftest import ROOT, make_code_cache, make_image_folder, tiny_kl
from tokenizer import save_tokenizer
from tokenizer.encode import main as encode
from tokenizer.vq import VQConfig, VQModel

FLOW = ["model.size=debug", "model.head=flow", "model.order.name=cell", "model.order.cell=2", "model.class_condition.tokens=0",
        "model.backbone.adaln=true", "model.pos_embed=learned", "model.token_dropout=0",
        "model.resid_dropout=0", "model.ffn_dropout=0", "train.global_batch=4", "train.max_steps=6",
        "train.log_every=2", "train.ckpt_every=3", "train.device=cpu", "train.threads=1",
        "train.precision=fp32", "grid.per_class=1", "grid.sampling.flow_steps=2"]
SAMPLE = ["device=cpu", "batch_size=2", "shard_size=2", "sampling.cfg_scale=2.0", "sampling.flow_steps=2",
          "precision=fp32"]


def run(script: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A random tiny KL tokenizer (16 px -> 4x4 latents of 4 channels) and its latent cache of
    2 classes x 4 random images."""
    root = tmp_path_factory.mktemp("flow")
    make_image_folder(root / "data", 16)
    kl = tiny_kl(root)
    encode([f"data.root={root / 'data'}", "data.resolution=16", f"tokenizer={kl}",
            f"out={root / 'latents'}", "num_workers=0"])
    return root


def test_flow_model_trains_and_samples(latents, tmp_path):
    run("train_gen.py", f"out_dir={tmp_path / 'gen'}", f"data.codes={latents / 'latents'}", *FLOW)
    weights = tmp_path / "gen" / "weights" / "ema.safetensors"
    model = load_generator(weights)
    assert model.spec.latent_channels == 4 and (model.spec.grid_h, model.spec.grid_w) == (4, 4)
    assert (tmp_path / "gen" / "grid_final.png").is_file()
    run("sample.py", f"weights={weights}", f"out={tmp_path / 'grid.png'}", "mode=grid", "per_class=2", *SAMPLE)
    assert Image.open(tmp_path / "grid.png").size[1] > 0
    run("sample.py", f"weights={weights}", f"out={tmp_path / 'images'}", "mode=images", "num_images=4", *SAMPLE)
    images = np.load(tmp_path / "images" / "samples.npz")
    assert images["arr_0"].shape == (4, 16, 16, 3) and images["arr_1"].tolist() == [0, 1, 0, 1]
    vq = VQConfig(codebook_size=32, codebook_dim=4, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=8)
    wrong = save_tokenizer(VQModel(vq), vq, tmp_path / "vq.safetensors")
    proc = run("sample.py", f"weights={weights}", f"tokenizer={wrong}", f"out={tmp_path / 'x.png'}",
               *SAMPLE, ok=False)
    assert proc.returncode == 1 and "a discrete tokenizer for a generator of latents" in proc.stderr


def test_cache_of_the_wrong_kind_is_refused(latents, tmp_path):
    proc = run("train_gen.py", f"out_dir={tmp_path / 'a'}", f"data.codes={latents / 'latents'}",
               "model.size=debug", "train.device=cpu", ok=False)
    assert proc.returncode == 1 and "holds continuous latents" in proc.stderr
    assert "model.head=flow" in proc.stderr
    codes = make_code_cache(tmp_path / "codes")
    proc = run("train_gen.py", f"out_dir={tmp_path / 'b'}", f"data.codes={codes}", *FLOW, ok=False)
    assert proc.returncode == 1 and "holds discrete codes" in proc.stderr and "KL tokenizer" in proc.stderr
