"""convert.xar and the flow path: xAR checkpoints -> argen weights, checked against outputs of
the original code (shared/fixtures/xar): the training forward (velocity and loss), the SDE and
ODE samplers fed the recorded noise, the key/shape contract at the released sizes, checkpoint
layouts and bad input."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from ar.checkpoint import load_generator
from ar.conditioning import ClassCondition
from ar.timestep import TimestepEmbedder
from ar.model import ARModel
from conftest import FIXTURES
from convert.xar import XARConvertConfig, convert_xar, infer_xar_spec, main
from sampling.flow import generate_flow, time_grid
from sampling.settings import SamplingConfig

XAR = FIXTURES.parent / "xar"
CKPT = XAR / "xar_tiny.pt"
pytestmark = pytest.mark.skipif(not CKPT.is_file(), reason=f"xAR fixtures not found at {XAR} "
                                                           f"(they sit beside the project in shared/)")


@pytest.fixture(scope="module")
def ref():
    return load_file(str(XAR / "xar_tiny_reference.safetensors"))


@pytest.fixture(scope="module")
def state():
    return torch.load(CKPT, weights_only=True)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("xar") / "xar.safetensors"
    return load_generator(convert_xar(XARConvertConfig(ckpt=str(CKPT), out=str(out)))).eval()


# ------------------------------------------------------------------------- parity

def test_training_forward_matches(model, ref):
    """Noisy context: each cell at its own t; v_pred within 2e-5, the loss to float precision."""
    order = model.order
    draws = (ref["train_t"], order.to_sequence(ref["train_eps"]))
    seq = order.to_sequence(ref["train_x"])
    x_t, target, t = model.head.training_pair(seq, order.step_of, draws)
    assert torch.allclose(x_t, ref["train_x_t"], atol=1e-6)
    assert torch.allclose(target, ref["train_v_target"], atol=1e-6)
    cond = ClassCondition(ref["train_labels"])
    with torch.no_grad():
        v = model.head.velocity(model.hidden(x_t, cond, t))
        loss = model(ref["train_x"], cond, draws=draws)["loss"]
    assert (v - ref["train_v_pred"]).abs().max().item() < 2e-5
    assert abs(loss.item() - ref["train_loss"].item()) < 1e-5 * ref["train_loss"].item()


@pytest.mark.parametrize("sampler", ["sde", "ode"])
def test_sampler_matches_recorded_run(model, ref, sampler):
    """xAR's sample_tokens (cfg 3, 8 steps, CFG linear across the 4 cells) with its recorded
    noise: the output latents within 1e-4."""
    recorded = ref[f"{sampler}_noise"]  # sde: (cell, draw, B, 64, 16); ode: (cell, B, 64, 16)

    def source(step, draw, shape):
        return recorded[step, draw] if sampler == "sde" else recorded[step]

    settings = SamplingConfig(cfg_scale=3.0, cfg_schedule="linear_full", flow_sampler=sampler,
                              flow_steps=8)
    out = generate_flow(model, ClassCondition(ref[f"{sampler}_labels"]), torch.arange(2), 0,
                        settings, noise_source=source)
    assert out.shape == ref[f"{sampler}_tokens"].shape  # (2, 16, 16, 16) NCHW grid
    assert (out - ref[f"{sampler}_tokens"]).abs().max().item() < 1e-4


def test_time_index_is_truncated_in_float32():
    """xAR's 8-step SDE grid gives indices 1000, 862, 725, ... (trunc of float32 t * 1000;
    rounding would give 863, 726, ...)."""
    grid = time_grid("sde", 8)[:-1]
    emb = TimestepEmbedder(8)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128, dtype=torch.float32) / 128)
    for t, k in zip(grid, [1000, 862, 725, 588, 451, 314, 177, 40]):
        expected = torch.cat([torch.cos(k * freqs), torch.sin(k * freqs)])
        got = emb.sinusoid(torch.tensor(t, dtype=torch.float64))
        assert torch.allclose(got, expected, atol=1e-6), (t, k)


def test_keyed_noise_does_not_depend_on_the_batch(model):
    """Image i gets the same latents alone or beside others (default keyed noise)."""
    settings = SamplingConfig(cfg_scale=2.0, flow_steps=2)
    both = generate_flow(model, ClassCondition(torch.tensor([4, 1])), torch.tensor([7, 3]), 5, settings)
    alone = generate_flow(model, ClassCondition(torch.tensor([1])), torch.tensor([3]), 5, settings)
    assert torch.allclose(both[1:], alone, atol=1e-5)
    assert not torch.allclose(both[0], both[1])


# ---------------------------------------------------------- released sizes, layouts

@pytest.mark.parametrize("name,size", [("xar_base", "xAR-B"), ("xar_large", "xAR-L"),
                                       ("xar_huge", "xAR-H")])
def test_released_sizes_map_key_for_key(name, size):
    """Every key of xAR-B/L/H maps to argen with its shape, and the parameter counts agree."""
    from convert.xar import _to_argen, argen_to_xar

    manifest = json.loads((XAR / "xar_manifest.json").read_text())["manifests"][name]
    shapes = {k: tuple(s) for k, s in manifest["state_dict"]}
    cells = torch.zeros(1, 1, 256, 256)  # the released 4 cells of 8 x 8: block-causal mask
    step = torch.arange(256) // 64
    cells[0, 0][step[None, :] > step[:, None]] = float("-inf")
    spec = infer_xar_spec(shapes, cells)
    assert spec.model.size == size and spec.model.order.cell == 8 and spec.latent_channels == 16
    with torch.device("meta"):
        model = ARModel(spec)
        fake = {k: torch.empty(s) for k, s in shapes.items()}
    mapped, _ = _to_argen(fake, spec.model.backbone.split, name)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in mapped.items()} == ours
    assert sum(p.numel() for p in model.parameters()) == manifest["n_parameters"]
    assert set(argen_to_xar(ours, spec.model.backbone.split).values()) <= set(shapes)


def test_training_checkpoint_converts_model_or_ema(tmp_path, state):
    """checkpoint-last.pth layout (pickled Namespace args let through): model or model_ema."""
    ema = {k: (v + 1.0 if k == "pred.bias" else v) for k, v in state.items()}
    ckpt = tmp_path / "checkpoint-last.pth"
    torch.save({"model": state, "model_ema": ema, "epoch": 3, "optimizer": {}, "scaler": {},
                "args": argparse.Namespace(model="xar_tiny", lr=4e-4)}, ckpt)
    plain = load_file(str(convert_xar(XARConvertConfig(ckpt=str(ckpt), out=str(tmp_path / "a.safetensors")))))
    averaged = load_file(str(convert_xar(XARConvertConfig(ckpt=str(ckpt), out=str(tmp_path / "b.safetensors"),
                                                          use_ema=True))))
    assert torch.equal(plain["head.output.bias"], state["pred.bias"])
    assert torch.equal(averaged["head.output.bias"], state["pred.bias"] + 1.0)


def test_other_size_is_a_named_error(tmp_path):
    with pytest.raises(ValueError, match="not xAR-B"):
        convert_xar(XARConvertConfig(ckpt=str(CKPT), out=str(tmp_path / "x.safetensors"), size="xAR-B"))


def test_bad_checkpoints_are_named_errors(tmp_path, state):
    llamagen = FIXTURES / "llamagen_gpt_c2i_tiny.pt"
    with pytest.raises(ValueError, match="not an xAR state dict"):
        convert_xar(XARConvertConfig(ckpt=str(llamagen), out=str(tmp_path / "x.safetensors")))
    extra = dict(state, **{"encoder_blocks.0.attn.q_norm.weight": torch.ones(16)})
    torch.save(extra, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="q_norm"):
        convert_xar(XARConvertConfig(ckpt=str(tmp_path / "extra.pt"), out=str(tmp_path / "y.safetensors")))
    rope = dict(state)
    rope["encoder_blocks.0.attn.rope.freqs_cos"] = rope["encoder_blocks.0.attn.rope.freqs_cos"].flip(0)
    torch.save(rope, tmp_path / "rope.pt")
    with pytest.raises(ValueError, match="RoPE"):
        convert_xar(XARConvertConfig(ckpt=str(tmp_path / "rope.pt"), out=str(tmp_path / "z.safetensors")))


def test_command_line(tmp_path):
    out = tmp_path / "cli.safetensors"
    main([str(CKPT), f"out={out}"])
    assert out.is_file()
    with pytest.raises(SystemExit, match="size='xAR-Q'|size=xAR-Q"):
        main([str(CKPT), f"out={out}", "size=xAR-Q"])
