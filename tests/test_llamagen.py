"""convert.llamagen: LlamaGen checkpoints -> argen weights, checked against outputs of the original
code (shared/fixtures/llamagen): logits, greedy KV-cache generation with and without CFG, VQ
codes and decoding, key/shape contract at the released sizes, checkpoint layouts, bad input."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from safetensors.torch import load_file

from ar.checkpoint import load_generator
from ar.conditioning import ClassCondition
from ar.config import transformer_args
from ar.model import ARModel
from conftest import FIXTURES
from convert.llamagen import (GPTConvertConfig, VQConvertConfig, argen_to_llamagen, convert_gpt,
                              convert_vq, infer_gpt_spec, infer_vq_config, main)
from sampling.generate import generate
from sampling.settings import SamplingConfig
from tokenizer import load_tokenizer
from tokenizer.vq import VQConfig, VQModel

GPT = FIXTURES / "llamagen_gpt_c2i_tiny.pt"
VQ = FIXTURES / "llamagen_vq_tiny.pt"
pytestmark = pytest.mark.skipif(not GPT.is_file(), reason=f"LlamaGen fixtures not found at {FIXTURES} "
                                                          f"(they sit beside the project in shared/)")
# the tiny GPT has an 8x8 grid; with VQ-16's downsampling that is 128 px. Its size is no LlamaGen
# size and its table of 11 rows could be 10 classes or 11: the README's 4 heads and 10 classes
GRID_ARGS = dict(image_size=128, downsample=16, n_head=4, num_classes=10)


@pytest.fixture(scope="module")
def ref():
    return load_file(str(FIXTURES / "llamagen_tiny_reference.safetensors"))


@pytest.fixture(scope="module")
def fixture_state():
    return torch.load(GPT, weights_only=True)["model"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt") / "gpt.safetensors"
    return load_generator(convert_gpt(GPTConvertConfig(ckpt=str(GPT), out=str(out), **GRID_ARGS)))


def gpt(tmp_path, ckpt, name="gpt.safetensors", **kw) -> dict:
    """Convert `ckpt` and return the tensors of the weights file."""
    args = {**GRID_ARGS, **kw}
    return load_file(str(convert_gpt(GPTConvertConfig(ckpt=str(ckpt), out=str(tmp_path / name), **args))))


# ------------------------------------------------------------------------- parity

def test_teacher_forced_logits_match(model, ref):
    ids, labels = ref["gpt_input_ids"], ref["gpt_class_labels"]
    with torch.no_grad():
        logits = model.head.logits(model.hidden(ids, ClassCondition(labels)))  # (3, 64, 256)
    diff = (logits - ref["gpt_teacher_forced_logits"]).abs().max().item()
    print(f"teacher-forced logits: max abs diff {diff:.3g}")
    assert logits.shape == (3, 64, 256) and diff < 1e-5


@pytest.mark.parametrize("case,scale", [("cfg4", 4.0), ("nocfg", 1.0)])
def test_greedy_kv_cache_generation_matches(model, ref, case, scale):
    labels = ref[f"gpt_greedy_{case}_labels"]
    codes = generate(model, ClassCondition(labels), torch.arange(len(labels)), seed=0,
                     settings=SamplingConfig(cfg_scale=scale, temperature=0.0))
    tokens = codes.flatten(1)  # raster order = LlamaGen's sequence order
    agree = (tokens == ref[f"gpt_greedy_{case}_tokens"]).float().mean().item()
    print(f"greedy {case}: token agreement {agree:.2%}")
    assert agree == 1.0


def test_null_class_is_llamagen_s(model, ref):
    assert model.cond.null == model.spec.num_classes == 10  # LlamaGen: id num_classes
    assert ref["gpt_class_labels"][-1] == 10  # the reference's unconditional row


def test_converted_vq_gives_the_same_codes_and_images(tmp_path, ref):
    tok = load_tokenizer(convert_vq(VQConvertConfig(ckpt=str(VQ), out=str(tmp_path / "vq.safetensors"))))
    assert tok.downsample == 2 and tok.codebook_size == 64
    assert torch.equal(tok.encode(ref["vq_images"]).flatten(1), ref["vq_codes"])
    diff = (tok.decode(ref["vq_codes"].view(2, 16, 16)) - ref["vq_decoded_from_codes"]).abs().max().item()
    print(f"VQ decode: max abs diff {diff:.3g}")
    assert diff < 1e-5


# ------------------------------------------------------------- key/shape contract

def test_released_sizes_have_llamagen_keys_and_shapes():
    manifests = json.loads((FIXTURES / "llamagen_manifest.json").read_text())["manifests"]
    sizes = {"GPT-B": "AR-B", "GPT-L": "AR-L", "GPT-XL": "AR-XL"}
    for name, shapes in manifests.items():
        shapes = {k: tuple(v) for k, v in shapes.items()}
        if name.startswith("VQ"):
            cfg = infer_vq_config(shapes)
            assert cfg == VQConfig()  # argen's VQ defaults are LlamaGen's VQ-16
            with torch.device("meta"):
                own = {k: tuple(v.shape) for k, v in VQModel(cfg).state_dict().items()}
            assert own == {k: v for k, v in shapes.items() if k != "quantize.codebook_used"}
            continue
        spec = infer_gpt_spec(shapes, image_size=256, downsample=16)
        assert spec.model.size == sizes[name.split()[0]] and spec.model.dim is None
        with torch.device("meta"):
            own = ARModel(spec).state_dict()
        names = argen_to_llamagen(own)
        assert {names[k]: tuple(v.shape) for k, v in own.items()} == shapes, name


@pytest.mark.parametrize("dim,layers,size", [(3200, 24, "AR-3B"), (2048, 22, "debug")])
def test_sizes_map_to_the_registry_or_explicit_overrides(dim, layers, size):
    """GPT-3B is in the registry; GPT-1B (not in it) is stored as explicit width/depth/heads."""
    shapes = {"tok_embeddings.weight": (16384, dim), "cls_embedding.embedding_table.weight": (1001, dim),
              "layers.0.attention.wqkv.weight": (3 * dim, dim),
              f"layers.{layers - 1}.ffn_norm.weight": (dim,)}
    m = infer_gpt_spec(shapes, image_size=384, downsample=16).model
    assert m.size == size and m.n_kv_head is None
    assert transformer_args(m).dim == dim and transformer_args(m).n_layer == layers
    assert transformer_args(m).n_head == 32


# ------------------------------------------------------------- checkpoint layouts

def test_every_layout_loads_the_same_weights(tmp_path, fixture_state):
    expected = gpt(tmp_path, GPT, "ref.safetensors")
    args = argparse.Namespace(gpt_model="GPT-B", lr=1e-4)  # LlamaGen pickles its args
    torch.save({"model": fixture_state, "optimizer": {"state": {}}, "steps": 5, "args": args},
               tmp_path / "ddp.pt")
    torch.save(fixture_state, tmp_path / "fsdp.pt")
    (tmp_path / "fsdp_dir").mkdir()
    torch.save(fixture_state, tmp_path / "fsdp_dir" / "consolidated.pth")
    torch.save({"module": fixture_state, "ds_version": "0.15.0"}, tmp_path / "ds.pt")
    for name in ("ddp.pt", "fsdp.pt", "fsdp_dir", "ds.pt"):
        got = gpt(tmp_path, tmp_path / name, name + ".safetensors")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in got), name


def test_ema_weights_are_taken_on_request(tmp_path, fixture_state):
    ema = {k: v * 0.5 for k, v in fixture_state.items()}
    torch.save({"model": fixture_state, "ema": ema}, tmp_path / "ddp.pt")
    got = gpt(tmp_path, tmp_path / "ddp.pt", use_ema=True)
    assert torch.equal(got["head.output.weight"], ema["output.weight"])
    torch.save(fixture_state, tmp_path / "raw.pt")
    with pytest.raises(ValueError, match="use_ema=true needs a DDP"):
        gpt(tmp_path, tmp_path / "raw.pt", use_ema=True)
    with pytest.raises(ValueError, match="no 'ema' entry"):
        gpt(tmp_path, GPT, use_ema=True)


def test_unknown_and_missing_keys_are_listed(tmp_path, fixture_state):
    state = dict(fixture_state)
    state["layers.0.attention.extra.weight"] = torch.zeros(2)
    torch.save({"model": state}, tmp_path / "unknown.pt")
    with pytest.raises(ValueError, match=r"layers\.0\.attention\.extra\.weight"):
        gpt(tmp_path, tmp_path / "unknown.pt")
    state = {k: v for k, v in fixture_state.items() if k not in ("norm.weight", "layers.1.ffn_norm.weight")}
    torch.save({"model": state}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="2 missing keys") as err:
        gpt(tmp_path, tmp_path / "missing.pt")
    assert "'layers.1.ffn_norm.weight'" in str(err.value) and "'norm.weight'" in str(err.value)
    state = {f"module.{k}": v for k, v in fixture_state.items()}
    torch.save(state, tmp_path / "wrapped.pt")
    with pytest.raises(ValueError, match="wrapper prefix"):
        gpt(tmp_path, tmp_path / "wrapped.pt")


class NotATensor:
    def __init__(self):
        self.payload = "anything"


def test_pickled_objects_are_refused(tmp_path, fixture_state):
    torch.save({"model": fixture_state, "extra": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="NotATensor.*weights_only=True"):
        gpt(tmp_path, tmp_path / "evil.pt")


def llamagen_freqs_cis(grid: int, head_dim: int, prefix: int = 1, base: float = 10000.0):
    """LlamaGen's 2D rotary table, from its definition: half the pairs turn with the row, half
    with the column, frequencies base^(-2k/(Dh/2)); zero rows at the class positions."""
    half = head_dim // 2
    freqs = base ** (-torch.arange(0, half, 2)[: half // 2].float() / half)  # (Dh/4,)
    t = torch.arange(grid).float()
    rows = torch.outer(t, freqs)[:, None].expand(grid, grid, -1)
    cols = torch.outer(t, freqs)[None, :].expand(grid, grid, -1)
    angles = torch.cat([rows, cols], dim=-1).flatten(0, 1)  # (grid^2, Dh/2)
    table = torch.stack([angles.cos(), angles.sin()], dim=-1)
    return torch.cat([torch.zeros(prefix, half, 2), table])


def test_stored_rotary_table_is_checked_then_dropped(tmp_path, fixture_state):
    state = {**fixture_state, "freqs_cis": llamagen_freqs_cis(grid=8, head_dim=16)}
    torch.save({"model": state}, tmp_path / "freqs.pt")
    assert "head.output.weight" in gpt(tmp_path, tmp_path / "freqs.pt")
    with pytest.raises(ValueError, match="freqs_cis"):
        gpt(tmp_path, tmp_path / "freqs.pt", image_size=256)  # a 16x16 grid


def test_cli_takes_a_bare_path_and_names_problems(tmp_path, capsys):
    tiny = ["n_head=4", "num_classes=10"]  # not a LlamaGen size (GRID_ARGS)
    out = main(["gpt", str(GPT), f"out={tmp_path / 'g.safetensors'}", "image_size=128", *tiny])
    assert load_generator(out).spec.grid_h == 8
    vq = main(["vq", str(VQ), f"out={tmp_path / 'vq.safetensors'}"])
    with pytest.raises(SystemExit, match="predicts 256 codes but tokenizer"):
        main(["gpt", str(GPT), f"out={tmp_path / 'x.safetensors'}", "image_size=16", f"tokenizer={vq}",
              *tiny])
    with pytest.raises(SystemExit, match="not found"):
        main(["vq", str(tmp_path / "nope.pt"), f"out={tmp_path / 'y.safetensors'}"])
