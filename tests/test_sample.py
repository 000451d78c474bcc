"""sample.py end to end on tiny random models: grids, process-count independence, resumption."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ar.checkpoint import export_generator
from ar.model import ARModel
from common.io import sha256_file
from conftest import ROOT, tiny_spec
from tokenizer import build_tokenizer, save_tokenizer
from tokenizer.vq import VQConfig

BASE = ["device=cpu", "batch_size=3", "shard_size=4", "sampling.cfg_scale=2.0"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random 2-level VQ (4x4 codes of 16x16 images) and a random generator over its codes."""
    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    vq_cfg = VQConfig(codebook_size=32, codebook_dim=4, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1,
                      z_channels=8)
    vq = save_tokenizer(build_tokenizer(vq_cfg), vq_cfg, root / "vq.safetensors")
    spec = tiny_spec(vocab=32, grid=4, classes=3)
    spec.tokenizer_path, spec.tokenizer_sha256 = str(vq), sha256_file(vq)
    model = ARModel(spec)
    torch.nn.init.normal_(model.head.output.weight, std=0.5)  # informative logits
    return export_generator(root / "gen.safetensors", model)


def run_sample(weights, *args, nproc=1, check=True):
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    proc = subprocess.run(launcher + [str(ROOT / "sample.py"), f"weights={weights}", *BASE, *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_grid_has_one_labelled_row_per_class(weights, tmp_path):
    run_sample(weights, f"out={tmp_path / 'grid.png'}", "mode=grid", "per_class=2")
    w, h = Image.open(tmp_path / "grid.png").size
    assert h > 3 * 16 and w > 2 * 16  # 3 rows of 2 images of 16 px, plus labels and gaps


def test_images_do_not_depend_on_the_number_of_processes(weights, tmp_path):
    args = ["mode=images", "num_images=10", "labels=random"]
    run_sample(weights, f"out={tmp_path / 'one'}", *args)
    run_sample(weights, f"out={tmp_path / 'two'}", *args, nproc=2)
    one, two = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert one["arr_0"].shape == (10, 16, 16, 3) and one["arr_0"].dtype == np.uint8
    assert np.array_equal(one["arr_0"], two["arr_0"])
    assert np.array_equal(one["arr_1"], two["arr_1"])
    assert len(set(one["arr_1"].tolist())) > 1  # random labels, not all one class
    assert len({im.tobytes() for im in one["arr_0"]}) == 10  # distinct noise per image


def test_balanced_labels_cycle_through_classes(weights, tmp_path):
    run_sample(weights, f"out={tmp_path / 's'}", "mode=images", "num_images=7")
    assert np.load(tmp_path / "s" / "samples.npz")["arr_1"].tolist() == [0, 1, 2, 0, 1, 2, 0]


def test_finished_shards_are_kept_and_the_rest_resumed(weights, tmp_path):
    out = tmp_path / "s"
    args = [f"out={out}", "mode=images", "num_images=10"]
    run_sample(weights, *args)
    full = np.load(out / "samples.npz")["arr_0"]
    # as if interrupted: shard 1 never finished, the .npz was never packed
    kept = out / "shard_00000" / "labels.json"
    stamp = kept.stat().st_mtime_ns
    for p in (out / "shard_00001").iterdir():
        p.unlink()
    (out / "shard_00001").rmdir()
    (out / "samples.npz").unlink()
    run_sample(weights, *args)
    assert kept.stat().st_mtime_ns == stamp  # not redone
    assert np.array_equal(np.load(out / "samples.npz")["arr_0"], full)


def test_other_settings_in_the_same_folder_are_refused(weights, tmp_path):
    out = tmp_path / "s"
    run_sample(weights, f"out={out}", "mode=images", "num_images=4")
    proc = run_sample(weights, f"out={out}", "mode=images", "num_images=4", "seed=1", check=False)
    assert proc.returncode != 0 and "seed" in proc.stderr and "other settings" in proc.stderr
    assert json.loads((out / "settings.json").read_text())["seed"] == 0


def test_replaced_tokenizer_is_a_clear_error(tmp_path):
    """A generator only makes sense with the tokenizer its codes came from: a changed file is refused."""
    torch.manual_seed(1)
    cfg = VQConfig(codebook_size=32, codebook_dim=4, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=8)
    vq = save_tokenizer(build_tokenizer(cfg), cfg, tmp_path / "vq.safetensors")
    spec = tiny_spec(vocab=32, grid=4, classes=3)
    spec.tokenizer_path, spec.tokenizer_sha256 = str(vq), sha256_file(vq)
    gen = export_generator(tmp_path / "gen.safetensors", ARModel(spec))
    torch.manual_seed(2)
    save_tokenizer(build_tokenizer(cfg), cfg, vq)  # retrained in place
    proc = run_sample(gen, f"out={tmp_path / 'g.png'}", check=False)
    assert proc.returncode != 0
    assert str(vq) in proc.stderr and "sha256 differs" in proc.stderr and "tokenizer=PATH" in proc.stderr


@pytest.mark.parametrize("sampler", ["coupled", "gsd"])
def test_speculative_samplers_write_grids_npz_and_their_cost(weights, tmp_path, sampler):
    spec = [f"sampler={sampler}", "speculative.window=6", "speculative.init=above"]
    run_sample(weights, f"out={tmp_path / 'grid.png'}", "mode=grid", "per_class=2", *spec)
    assert Image.open(tmp_path / "grid.png").size[1] > 3 * 16
    run_sample(weights, f"out={tmp_path / 'one'}", "mode=images", "num_images=10", *spec)
    run_sample(weights, f"out={tmp_path / 'two'}", "mode=images", "num_images=10", *spec, nproc=2)
    one, two = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert one["arr_0"].shape == (10, 16, 16, 3) and np.array_equal(one["arr_0"], two["arr_0"])
    record = json.loads((tmp_path / "one" / "sampler.json").read_text())
    assert record["sampler"] == sampler and record["speculative"]["window"] == 6
    assert record["images"] == 10 and record["plain_forward_passes_per_image"] == 15  # 16 tokens
    assert 1 <= record["forward_passes_per_image"] <= 16
    assert record["mean_accepted_length"] == pytest.approx(16 / record["forward_passes_per_image"], abs=1e-2)
    assert json.loads((tmp_path / "two" / "sampler.json").read_text())["forward_passes_per_image"] == \
        record["forward_passes_per_image"]
    settings = json.loads((tmp_path / "one" / "settings.json").read_text())
    assert settings["sampler"] == sampler  # another sampler in this folder is refused
    proc = run_sample(weights, f"out={tmp_path / 'one'}", "mode=images", "num_images=10", check=False)
    assert proc.returncode != 0 and "sampler" in proc.stderr


def test_guidance_is_on_whenever_the_scale_is_not_one():
    """argen's rule (sampling/guidance.py): the rows are guided whenever cfg_scale != 1, so a
    scale below 1 moves toward the unconditional prediction and 0 samples the null class alone
    (LlamaGen's own code guides only above 1; reproduce.py follows it for its checkpoints)."""
    from ar.conditioning import ClassCondition
    from conftest import tiny_model
    from sampling.generate import generate
    from sampling.settings import SamplingConfig
    from sampling.guidance import uses_cfg

    model, ids = tiny_model(), torch.arange(3)
    greedy = [SamplingConfig(temperature=0.0, cfg_scale=scale) for scale in (0.0, 1.0, 4.0)]
    assert [uses_cfg(s) for s in greedy] == [True, False, True]
    null = generate(model, ClassCondition(torch.full((3,), model.cond.null)), ids, 0, greedy[1])
    classes = ClassCondition(torch.tensor([0, 1, 2]))
    assert torch.equal(generate(model, classes, ids, 0, greedy[0]), null)
    assert not torch.equal(generate(model, classes, ids, 0, greedy[2]), null)
