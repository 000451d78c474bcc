"""Text-to-image: caption tokenizers, the caption cache, text conditions in the model and the
data stream, prompts at sampling time, and the pipeline encode -> train -> sample."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ar.conditioning import TextCondition
from ar.conditioning.captions import CaptionCache, CaptionSource
from ar.data import BatchStream, CodeCache
from ar.model import ARModel
from conftest import ROOT, cached_logits, make_code_cache, make_image_folder, tiny_text_spec
from sampling.generate import generate
from sampling.settings import SamplingConfig
from tokenizer.text import PAD, CaptionTokenizer, left_pad, train_caption_tokenizer
from tokenizer.text_cache import TextCacheConfig, read_text_meta, write_text_cache

CAPTIONS = [f"a {size} {color} {shape} on a {bg} background"
            for size in ("small", "large") for color in ("red", "blue", "green")
            for shape in ("star", "circle") for bg in ("grey", "black")]


def test_caption_tokenizers_round_trip_and_bpe_learns_words():
    byte = CaptionTokenizer("byte")
    assert byte.decode(byte.encode("a red star, é")) == "a red star, é" and PAD not in byte.encode("abc")
    bpe = train_caption_tokenizer(CAPTIONS, "bpe", 300)
    ids = bpe.encode(CAPTIONS[0])
    assert len(ids) <= 9 < len(byte.encode(CAPTIONS[0]))  # about a token a word
    assert bpe.decode(ids) == CAPTIONS[0] and PAD not in ids
    unseen = "a magenta hexagon"  # words it never saw still encode, byte by byte
    assert bpe.decode(bpe.encode(unseen)) == unseen
    again = CaptionTokenizer("bpe", bpe.to_json())  # what the weights file stores
    assert again.encode(CAPTIONS[3]) == bpe.encode(CAPTIONS[3])
    assert left_pad([[5, 6], []], 4).tolist() == [[0, 0, 5, 6], [0, 0, 0, 0]]


def _tiny_vq(folder):
    """A random VQ: 32 codes, 4x4 of them per 16-px image."""
    from tokenizer import save_tokenizer
    from tokenizer.vq import VQConfig, VQModel

    torch.manual_seed(0)
    cfg = VQConfig(codebook_size=32, codebook_dim=4, ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, z_channels=8)
    return save_tokenizer(VQModel(cfg), cfg, folder / "vq.safetensors")


def _captioned_cache(path, n=24, captions=CAPTIONS, vq=None):
    from common.io import sha256_file

    make_code_cache(path, n=n, grid=4, vocab=32, classes=3, shard_size=10,
                    tokenizer_path=str(vq or ""), tokenizer_sha=sha256_file(vq) if vq else "")
    lines = [json.dumps({"index": i, "caption": captions[i % len(captions)]}) for i in range(n)]
    (path / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return path


def test_caption_cache_layout_cut_and_staleness(tmp_path):
    cache = _captioned_cache(tmp_path / "codes")
    meta = write_text_cache(cache, TextCacheConfig(kind="byte"))
    tokens = np.load(cache / "text" / "tokens.npy")
    longest = max(len(c.encode()) for c in CAPTIONS)
    assert meta["max_tokens"] == longest == tokens.shape[1] and meta["truncated"] == 0
    assert CaptionTokenizer("byte").decode(tokens[1]) == CAPTIONS[1]
    assert tokens[1, 0] == PAD and tokens[1, -1] != PAD  # left-padded: the caption ends last
    assert (np.load(cache / "text" / "null.npy") == PAD).all()  # the empty caption
    assert write_text_cache(cache, TextCacheConfig(kind="byte")) == meta  # nothing to redo
    cut = write_text_cache(cache, TextCacheConfig(kind="byte", max_tokens=20))
    assert cut["truncated"] == 24 and np.load(cache / "text" / "lengths.npy").max() == 20
    (cache / "captions.jsonl").write_text((cache / "captions.jsonl").read_text().replace("red", "pink"))
    with pytest.raises(ValueError, match="other captions"):
        read_text_meta(cache)


def test_caption_less_data_is_a_named_error(tmp_path):
    cache = make_code_cache(tmp_path / "codes", n=8)
    with pytest.raises(ValueError, match="no captions.jsonl"):
        write_text_cache(cache, TextCacheConfig(kind="bpe"))
    with pytest.raises(ValueError, match="no caption cache"):
        CaptionCache(cache, 8)


def test_stream_feeds_captions_of_the_original_images_and_drops_to_the_empty_one(tmp_path):
    cache = _captioned_cache(tmp_path / "codes")
    write_text_cache(cache, TextCacheConfig(kind="bpe", vocab_size=300))
    codes = CodeCache(cache)
    source = CaptionSource(cache, codes)
    stream = BatchStream(codes, seed=0, cond_dropout=0.3, source=source)
    batch, cond = stream.batch(0, 24)
    indices, _, drop = stream.plan(0, 24)
    assert torch.equal(batch, codes.get(indices, np.zeros(24, dtype=np.int64)))  # never flipped
    assert drop.any() and (~drop).any()
    assert (cond.text[torch.from_numpy(drop)] == PAD).all()
    kept = np.nonzero(~drop)[0]
    rows = np.load(cache / "text" / "tokens.npy")[indices[kept]]
    assert torch.equal(cond.text[torch.from_numpy(kept)], torch.from_numpy(rows).long())


@pytest.mark.parametrize("kind,pooled", [("tokens", False), ("tokens", True), ("features", True)])
def test_text_models_decode_with_the_cache_as_in_a_full_forward(kind, pooled):
    torch.manual_seed(0)
    model = ARModel(tiny_text_spec(kind, grid=4, cond_add=pooled)).eval()
    torch.nn.init.normal_(model.head.output.weight, std=0.5)
    text = torch.randint(0, 20, (2, 5)) if kind == "tokens" else torch.randn(2, 5, 8)
    cond = TextCondition(text).with_null(model.cond.null)
    assert model.prefix == 5 and len(cond) == 4
    seq = torch.randint(0, 32, (4, 16))
    full = model.head.logits(model.hidden(seq, cond))
    assert torch.allclose(full, cached_logits(model, seq, cond), atol=1e-5)
    if pooled:  # the pooled caption reaches every input: the empty caption's is its own
        vector = model.cond.input_vector(cond)
        assert vector.shape == (4, 1, 64) and not torch.allclose(vector[0], vector[2])


def test_pooled_caption_ignores_padding():
    torch.manual_seed(0)
    model = ARModel(tiny_text_spec(grid=4, cond_add=True))
    short = TextCondition(torch.tensor([[0, 0, 0, 7, 9]]))
    assert torch.allclose(model.cond.input_vector(short),
                          model.cond.pool(model.cond.tokens(torch.tensor([[7, 9]])).mean(1, keepdim=True)))


def test_text_loss_counts_caption_tokens_only():
    torch.manual_seed(0)
    model = ARModel(tiny_text_spec(grid=4, text_loss=0.5))
    torch.nn.init.normal_(model.cond.output.weight, std=0.5)
    codes = torch.randint(0, 32, (2, 4, 4))
    empty = TextCondition(torch.zeros(2, 5, dtype=torch.long))
    assert model(codes, empty)["text_loss"] == 0  # nothing to predict in an empty caption
    text = TextCondition(torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 5]]))
    out = model(codes, text)
    assert out["text_loss"] > 0 and out["loss"] > model.head.loss(
        model.hidden(model.order.to_sequence(codes), text), model.order.to_sequence(codes))[0]


def test_a_text_model_learns_which_caption_draws_which_image():
    """Four captions, four code grids: after training, each caption draws its own grid."""
    torch.manual_seed(0)
    model = ARModel(tiny_text_spec(grid=4, text_vocab=40, max_tokens=6))
    tok = CaptionTokenizer("byte")
    prompts = ["red", "blue", "a star", "green"]
    text = torch.from_numpy(left_pad([[min(i, 39) for i in tok.encode(p)] for p in prompts], 6)).long()
    grids = torch.randint(0, 32, (4, 4, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        model(grids, TextCondition(text))["loss"].backward()
        opt.step()
    drawn = generate(model.eval(), TextCondition(text), torch.arange(4), 0, SamplingConfig(temperature=0))
    assert torch.equal(drawn, grids)


def test_prompts_are_checked_against_the_model(tmp_path):
    torch.manual_seed(0)
    model = ARModel(tiny_text_spec(grid=4, text_vocab=257, max_tokens=6)).eval()
    cond = model.cond.prompt_rows(["red", ""], "cpu")
    assert cond.text.tolist()[1] == [PAD] * 6 and cond.text[0, -1] == ord("d") + 1
    with pytest.raises(ValueError, match=r'prompt "a long prompt" is 13 tokens.*at most 6'):
        model.cond.prompt_rows(["a long prompt"], "cpu")
    with pytest.raises(ValueError, match="text-to-image: give prompt"):
        model.cond.grid_rows(None, None, "cpu")


def _run(script, *args):
    proc = subprocess.run([sys.executable, *script, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_pipeline_encode_train_sample_with_prompts(tmp_path):
    folder = make_image_folder(tmp_path / "data", 16, per_class=6)
    lines = [json.dumps({"file": f"{c}/{i}.png", "caption": f"a {c} number {i}"})
             for c in ("cat", "dog") for i in range(6)]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    vq = _tiny_vq(tmp_path)
    codes = tmp_path / "codes"
    _run(["-m", "tokenizer.encode"], f"data.root={folder}", "data.resolution=16", f"tokenizer={vq}",
         f"out={codes}", "num_workers=0", "text.kind=bpe", "text.vocab_size=300")
    run = tmp_path / "gen"
    _run([str(ROOT / "train_gen.py")], f"out_dir={run}", f"data.codes={codes}", "model.size=debug",
         "model.condition=text", "model.text_condition.loss=0.1", "model.inputs.name=shuffle", "model.order.name=cell",
         "model.order.cell=2", "train.global_batch=4", "train.max_steps=3", "train.device=cpu",
         "train.precision=fp32", "grid.per_class=2")
    assert (run / "grid_final.png").is_file()  # rows of the cache's captions
    weights = run / "weights" / "ema.safetensors"
    (tmp_path / "prompts.txt").write_text("a cat number 1\n\na dog number 5\n")
    sample = [str(ROOT / "sample.py"), f"weights={weights}", "device=cpu", "sampling.cfg_scale=3",
              "sampling.cfg_schedule=half_linear"]
    _run(sample, f"out={tmp_path / 'grid.png'}", f"prompts={tmp_path / 'prompts.txt'}", "per_class=2")
    _run(sample, f"out={tmp_path / 'samples'}", "mode=images", "num_images=5", "shard_size=2",
         f"prompts={tmp_path / 'prompts.txt'}")
    npz = np.load(tmp_path / "samples" / "samples.npz", allow_pickle=False)
    assert npz["arr_0"].shape == (5, 16, 16, 3) and npz["arr_1"].tolist() == [0, 1, 0, 1, 0]
    assert npz["prompts"].tolist() == ["a cat number 1", "a dog number 5"] * 2 + ["a cat number 1"]
    settings = json.loads((tmp_path / "samples" / "settings.json").read_text())
    assert settings["sampling"]["cfg_schedule"] == "half_linear"
    assert settings["prompts"] == ["a cat number 1", "a dog number 5"]


def test_encoder_features_pipeline_and_its_named_errors(tmp_path):
    """A frozen (tiny, random) T5 from a local folder: cached features, training, prompts."""
    from tiny_text_encoders import CAPTIONS as SHAPE_CAPTIONS, WIDTH, make_tiny_t5

    t5 = make_tiny_t5(tmp_path / "t5")
    cache = _captioned_cache(tmp_path / "codes", captions=SHAPE_CAPTIONS, vq=_tiny_vq(tmp_path))
    meta = write_text_cache(cache, TextCacheConfig(kind="encoder", encoder=str(t5)))
    features = np.load(cache / "text" / "features.npy")
    assert meta["kind"] == "features" and features.shape == (24, meta["max_tokens"], WIDTH)
    assert features.dtype == np.float16 and np.abs(np.load(cache / "text" / "null.npy")).sum() > 0
    run = tmp_path / "gen"
    _run([str(ROOT / "train_gen.py")], f"out_dir={run}", f"data.codes={cache}", "model.size=debug",
         "model.condition=text", "train.global_batch=4", "train.max_steps=2", "train.device=cpu",
         "grid.per_class=1")
    weights = run / "weights" / "ema.safetensors"
    from ar.checkpoint import load_generator

    model = load_generator(weights)
    assert model.spec.text.encoder == str(t5.resolve()) and model.spec.text.channels == WIDTH
    assert torch.equal(model.cond.null, torch.from_numpy(np.load(cache / "text" / "null.npy")).float())
    _run([str(ROOT / "sample.py")], f"weights={weights}", "device=cpu", f"out={tmp_path / 'g.png'}",
         f"prompt={SHAPE_CAPTIONS[0]}", "per_class=2")
    for folder, message in ((tmp_path / "nowhere", "does not exist"), (cache, "config.json")):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            write_text_cache(cache, TextCacheConfig(kind="encoder", encoder=str(folder)))


def test_prompt_files_plain_or_captions_jsonl(tmp_path):
    from sampling.prompts import read_prompts

    (tmp_path / "p.txt").write_text("a red star\n\n  a blue ring \n")
    assert read_prompts(tmp_path / "p.txt") == ["a red star", "a blue ring"]
    (tmp_path / "captions.jsonl").write_text('{"file": "a/0.png", "caption": "a red star"}\n')
    assert read_prompts(tmp_path / "captions.jsonl") == ["a red star"]
    (tmp_path / "bad.jsonl").write_text('{"file": "a/0.png"}\n')
    with pytest.raises(ValueError, match="line 1.*caption"):
        read_prompts(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="one prompt a line"):
        read_prompts(tmp_path / "missing.txt")


def test_speculative_decoding_reads_captions_too():
    from sampling.generate import sample_codes
    from sampling.speculative import SpeculativeConfig

    torch.manual_seed(0)
    model = ARModel(tiny_text_spec(grid=4, cond_add=True)).eval()
    torch.nn.init.normal_(model.head.output.weight, std=0.5)
    cond, ids = TextCondition(torch.randint(0, 20, (3, 5))), torch.arange(3)
    settings = SamplingConfig(temperature=0.0, cfg_scale=2.0, cfg_schedule="half_linear")
    plain = generate(model, cond, ids, 0, settings)
    codes, _ = sample_codes(model, cond, ids, 0, settings, "coupled", SpeculativeConfig(window=4))
    assert torch.equal(codes, plain)


def test_text_loss_on_encoder_features_is_refused():
    with pytest.raises(ValueError, match="text_condition.loss"):
        ARModel(tiny_text_spec("features", grid=4, text_loss=0.1))
