"""Frozen text-encoder features (tokenizer/text_encoder.py) on tiny random T5 and CLIP folders:
the left-padded layout, agreement with transformers run directly, no leak from padding, the
empty caption, overflow, and named errors for the folders users get wrong."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

from tiny_text_encoders import CAPTIONS, WIDTH, make_tiny_clip, make_tiny_t5  # noqa: E402
from tokenizer.text_encoder import load_text_encoder  # noqa: E402

MAKERS = {"t5": make_tiny_t5, "clip": make_tiny_clip}
LONG = "a large blue circle at the top left on a grey background with a small red star"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(kind, full) -> a saved tiny encoder folder; full: the whole model, as hub folders are."""
    root = tmp_path_factory.mktemp("text_encoders")
    return {(kind, full): make(root / f"{kind}_{full}", full=full)
            for kind, make in MAKERS.items() for full in (False, True)}


@pytest.fixture(scope="module")
def encoders(folders):
    return {key: load_text_encoder(path) for key, path in folders.items()}


def direct_features(folder, caption: str, full: bool, input_ids=None) -> np.ndarray:
    """(n, C) last hidden state of one unpadded caption, straight from transformers."""
    import transformers

    if input_ids is None:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        input_ids = tok(caption)["input_ids"]
    kind = json.loads((folder / "config.json").read_text())["model_type"]
    cls = {"t5": transformers.T5ForConditionalGeneration if full else transformers.T5EncoderModel,
           "clip": transformers.CLIPModel, "clip_text_model": transformers.CLIPTextModel}[kind]
    model = cls.from_pretrained(str(folder), local_files_only=True).eval()
    # the full models' text towers, reached through their own modules, not our loading path
    tower = model.get_encoder() if kind == "t5" and full else model  # the text tower only
    tower = model.text_model if kind == "clip" else tower
    with torch.no_grad():
        out = tower(input_ids=torch.tensor([input_ids])).last_hidden_state
    return out[0].numpy()


@pytest.mark.parametrize("full", [False, True], ids=["encoder", "full_model"])
@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_features_layout_and_values(encoders, folders, kind, full):
    enc = encoders[kind, full]
    assert enc.kind == kind and enc.channels == WIDTH
    captions = CAPTIONS[:3] + ["a red star", LONG]
    feats, lengths = enc.features(captions, max_tokens=24)
    assert feats.shape == (5, 24, WIDTH) and feats.dtype == np.float16
    assert lengths.dtype == np.int32 and lengths.tolist() == enc.count_tokens(captions)
    for i, n in enumerate(lengths):
        assert np.all(feats[i, :24 - n] == 0)  # left padding: exact zeros
        assert np.all(np.abs(feats[i, 24 - n:]).sum(-1) > 0)  # every token row carries features
    expect = direct_features(folders[kind, full], LONG, full)
    assert expect.shape == (lengths[-1], WIDTH)
    np.testing.assert_allclose(feats[-1, 24 - lengths[-1]:].astype(np.float32), expect,
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_padding_does_not_leak(encoders, kind):
    enc = encoders[kind, False]
    alone, n = enc.features(["a red star"], max_tokens=24)
    mixed = [LONG, "a red star", CAPTIONS[0], LONG + " and a ring"]
    for batch_size in (64, 3):  # one batch; and batches that pair it with other lengths
        batched, lengths = enc.features(mixed, max_tokens=24, batch_size=batch_size)
        assert lengths[1] == n[0]
        np.testing.assert_allclose(batched[1], alone[0], atol=1e-3)


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_empty_caption(encoders, kind):
    enc = encoders[kind, False]
    feats, lengths = enc.features(["", "a red star"], max_tokens=8)
    specials = {"t5": 1, "clip": 2}[kind]  # </s>; <|startoftext|> <|endoftext|>
    assert lengths[0] == specials and enc.count_tokens([""]) == [specials]
    assert np.all(feats[0, :8 - specials] == 0)
    assert np.all(np.abs(feats[0, 8 - specials:]).sum(-1) > 0)
    empty, _ = enc.features([], max_tokens=8)
    assert empty.shape == (0, 8, WIDTH)


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_overflow(encoders, folders, kind):
    enc = encoders[kind, False]
    n = enc.count_tokens([LONG])[0]
    with pytest.raises(ValueError, match=rf"'a large blue circle.*' has {n} tokens.*limit of 6"):
        enc.features(["a red star", LONG], max_tokens=6)
    feats, lengths = enc.features(["a red star", LONG], max_tokens=6, overflow="truncate")
    assert lengths[1] == 6 and np.abs(feats[1]).sum(-1).all()
    # the first tokens, closing special token kept (as a tokenizer's truncation=True does)
    full_ids = enc.tokenizer(LONG)["input_ids"]
    kept = full_ids[:5] + [enc.tokenizer.eos_token_id]
    expect = direct_features(folders[kind, False], LONG, False, input_ids=kept)
    np.testing.assert_allclose(feats[1].astype(np.float32), expect, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="overflow="):
        enc.features([LONG], max_tokens=6, overflow="drop")


def test_clip_positions_cap_tokens(encoders):
    enc = encoders["clip", False]  # 32 learned positions
    caption = " ".join([CAPTIONS[0]] * 3)
    with pytest.raises(ValueError, match="32 positions"):
        enc.features([caption], max_tokens=64)
    feats, lengths = enc.features([caption], max_tokens=64, overflow="truncate")
    assert lengths[0] == 32 and feats.shape == (1, 64, WIDTH) and np.all(feats[0, :32] == 0)


def test_identity_tracks_weights(tmp_path):
    folder = make_tiny_t5(tmp_path / "t5", seed=0)
    first = load_text_encoder(folder).identity()
    assert first["model_type"] == "t5" and first["channels"] == WIDTH
    assert first == load_text_encoder(folder).identity()
    make_tiny_t5(folder, seed=1)  # same config and tokenizer, other weights
    second = load_text_encoder(folder).identity()
    assert second["sha256"] != first["sha256"]
    assert second["tokenizer_sha256"] == first["tokenizer_sha256"]


def test_named_errors(tmp_path, folders):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'} does not exist"):
        load_text_encoder(tmp_path / "nowhere")
    weights = folders["t5", False] / "model.safetensors"
    with pytest.raises(ValueError, match="is a file; pass the folder"):
        load_text_encoder(weights)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json: not a transformers model folder"):
        load_text_encoder(tmp_path / "empty")

    no_tok = tmp_path / "no_tokenizer"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folders["t5", False] / name, no_tok)
    with pytest.raises(FileNotFoundError, match=f"{no_tok}: no tokenizer files"):
        load_text_encoder(no_tok)

    no_weights = tmp_path / "no_weights"
    shutil.copytree(folders["clip", False], no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=f"{no_weights}: no weights file"):
        load_text_encoder(no_weights)

    partial = tmp_path / "partial_weights"  # transformers alone would init the rest at random
    shutil.copytree(folders["t5", False], partial)
    tensors = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if "block.1." not in k},
              partial / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weights lack \d+ of the T5EncoderModel parameters"):
        load_text_encoder(partial)

    other_tok = tmp_path / "other_tokenizer"  # CLIP's 647-token tokenizer on the T5 encoder
    shutil.copytree(folders["t5", False], other_tok)
    shutil.copy(folders["clip", False] / "tokenizer.json", other_tok)
    shutil.copy(folders["clip", False] / "tokenizer_config.json", other_tok)
    with pytest.raises(ValueError, match="belong to another model"):
        load_text_encoder(other_tok)


@pytest.mark.parametrize("config_class", ["ViTConfig", "GPT2Config"])
def test_non_text_model_named(tmp_path, config_class):
    import transformers

    getattr(transformers, config_class)().save_pretrained(tmp_path)
    model_type = json.loads((tmp_path / "config.json").read_text())["model_type"]
    with pytest.raises(ValueError, match=rf"model_type '{model_type}'.*not a supported text "
                                         rf"encoder.*'clip'.*'t5'"):
        load_text_encoder(tmp_path)


def test_captions_must_be_a_list(encoders):
    enc = encoders["t5", False]
    with pytest.raises(TypeError, match=r"wrap a single caption as \[caption\]"):
        enc.features("a red star", max_tokens=8)
    with pytest.raises(TypeError, match="caption 1 is None"):
        enc.features(["a red star", None], max_tokens=8)


def test_a_truncated_weights_file_is_named(tmp_path, folders):
    broken = tmp_path / "truncated"
    shutil.copytree(folders["t5", False], broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"{broken / 'model.safetensors'}: not a readable "
                                         f"safetensors file, truncated or corrupt"):
        load_text_encoder(broken)


def test_encode_checks_the_text_inputs_before_encoding_any_image(tmp_path, folders):
    """A bad encoder folder, or a dataset without captions, is named before the images are
    encoded (no shard written), not after."""
    import subprocess
    import sys

    from conftest import ROOT, make_image_folder
    from tokenizer import save_tokenizer
    from tokenizer.vq import VQConfig, VQModel

    cfg = VQConfig(codebook_size=32, codebook_dim=4, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1,
                   z_channels=8)
    vq = save_tokenizer(VQModel(cfg), cfg, tmp_path / "vq.safetensors")
    data = make_image_folder(tmp_path / "data", 16)
    no_captions = [f"data.root={data}", "data.resolution=16", f"tokenizer={vq}", "num_workers=0"]
    lines = [json.dumps({"file": f"{c}/{i}.png", "caption": f"a {c}"})
             for c in ("cat", "dog") for i in range(4)]
    captioned = tmp_path / "captioned"
    shutil.copytree(data, captioned)
    (captioned / "captions.jsonl").write_text("\n".join(lines) + "\n")
    broken = tmp_path / "broken_t5"
    shutil.copytree(folders["t5", False], broken)
    (broken / "model.safetensors").write_bytes(b"")
    cases = [(no_captions + ["text.kind=bpe"], "has no captions.jsonl"),
             ([f"data.root={captioned}", *no_captions[1:], "text.kind=encoder",
               f"text.encoder={tmp_path / 'nowhere'}"], "nowhere does not exist"),
             ([f"data.root={captioned}", *no_captions[1:], "text.kind=encoder",
               f"text.encoder={broken}"], "model.safetensors: not a readable safetensors file")]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"codes{i}"
        proc = subprocess.run([sys.executable, "-m", "tokenizer.encode", *args, f"out={out}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1 and message in proc.stderr.splitlines()[-1], proc.stderr[-2000:]
        assert not list(out.glob("codes_*.npy")), "images were encoded before the check"
