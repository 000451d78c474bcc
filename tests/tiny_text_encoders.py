"""Tiny, randomly initialised text encoders saved as local transformers folders, for tests.

tokenizer/text_encoder.py loads what users bring: a folder with config.json, weights and
tokenizer files. The tests need such folders without a download, so these helpers build them
offline in milliseconds: a tokenizer from a small vocabulary of shapes-dataset words (built with
transformers' own T5Tokenizer / CLIPTokenizer, so the saved files are the real formats) and a
2-layer encoder of width 32. `full=True` saves the whole model as the hub folders do (FLAN-T5
with its decoder, CLIP with its vision tower), which the loader must cut down to the text
encoder. Not a test module: import with `from tiny_text_encoders import make_tiny_t5`.
"""

from __future__ import annotations

from pathlib import Path

import torch

# the shapes dataset's caption words (dataset/shapes.py) plus a few fillers
WORDS = ("a an the small medium large red green blue yellow orange purple white cyan grey black "
         "navy beige circle crescent cross diamond ring square star triangle at top bottom left "
         "right center on background in of with and").split()
COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "white", "cyan")
SHAPES = ("circle", "crescent", "cross", "diamond", "ring", "square", "star", "triangle")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom",
             "bottom right")
SIZES, BACKGROUNDS = ("small", "medium", "large"), ("grey", "black", "white", "navy", "beige")
CAPTIONS = [f"a {SIZES[i % 3]} {COLORS[i % 8]} {SHAPES[i * 3 % 8]} at the {POSITIONS[i % 9]} "
            f"on a {BACKGROUNDS[i % 5]} background" for i in range(72)]
WIDTH = 32  # the encoders' feature width C


def _t5_tokenizer():
    from transformers import T5Tokenizer

    # a Unigram vocabulary as T5's sentencepiece has it: <pad>=0, </s>=1, <unk>=2, then pieces
    # ("▁" marks a word start); whole words score above single characters, so known words stay
    # one token and unknown words spell out, as with a real vocabulary
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-'"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def make_tiny_t5(folder: str | Path, seed: int = 0, full: bool = False) -> Path:
    """A tiny random T5 encoder (T5EncoderModel; with `full`, T5ForConditionalGeneration like
    FLAN-T5's folders) with its tokenizer, saved into `folder`."""
    from transformers import T5Config, T5EncoderModel, T5ForConditionalGeneration

    folder = Path(folder)
    tokenizer = _t5_tokenizer()
    cfg = T5Config(vocab_size=len(tokenizer) + 4,  # real T5 too has a few unused embedding rows
                   d_model=WIDTH, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=1,
                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    model = (T5ForConditionalGeneration if full else T5EncoderModel)(cfg)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _clip_tokenizer():
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    # byte-level BPE as CLIP has it: the 256 byte symbols, each also as a word end ("</w>"),
    # then merges that spell each known word left to right; unknown words stay in pieces.
    # Written out rather than trained: BpeTrainer breaks ties in hash order, so two trainings
    # give different merges and the folder's hash would change from run to run
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = ["<|startoftext|>", "<|endoftext|>"] + alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    for word in sorted(set(WORDS)):
        head = word[0]
        for k, c in enumerate(word[1:], start=2):
            tail = c + "</w>" if k == len(word) else c
            merges.append((head, tail))
            head += tail
    for pair in dict.fromkeys(merges):  # keeps the first of each, in order
        tokens.append("".join(pair))
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=list(dict.fromkeys(merges)))


def make_tiny_clip(folder: str | Path, seed: int = 0, full: bool = False) -> Path:
    """A tiny random CLIP text encoder (CLIPTextModel, model_type clip_text_model; with `full`,
    a CLIPModel with a tiny vision tower, model_type clip) with its tokenizer, in `folder`."""
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    tokenizer = _clip_tokenizer()
    text = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, projection_dim=16,
                          max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if full:
        vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, image_size=32, patch_size=16)
        model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision,
                                     projection_dim=16))
    else:
        model = CLIPTextModel(text)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
