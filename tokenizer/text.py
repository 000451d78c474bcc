"""Caption tokenizers: what turns a caption into the token ids of a unified text + image
sequence (Token-Shuffle's design: no text encoder, the generator reads the caption itself).

    byte  the caption's UTF-8 bytes, ids 1..256: nothing to train, any text, one token a
          character (a 60-character shapes caption is 60 tokens)
    bpe   byte-level BPE trained on the dataset's captions with the `tokenizers` library
          (GPT-2's pre-tokenizer, so any text still encodes): a few hundred ids cover the
          caption vocabulary with about a token a word (shapes: 11-13 tokens a caption)

Id 0 is padding in both. A caption of n tokens is left-padded to the model's text length T:
ids [0] * (T - n) + tokens, so that its last token sits right before the image, wherever the
caption ends. The empty caption is all padding: the null condition of classifier-free guidance.
The trained BPE is plain JSON (`to_json`), stored in the generator's weights file, so sampling a
prompt needs no other file.
"""

from __future__ import annotations

import json

import numpy as np

PAD = 0
TEXT_TOKENIZERS = ("byte", "bpe")


class CaptionTokenizer:
    """Caption -> token ids (no padding); `kind` byte | bpe, `vocab_size` padding included."""

    def __init__(self, kind: str, state: str = ""):
        if kind not in TEXT_TOKENIZERS:
            raise ValueError(f"caption tokenizer {kind!r} is not one of {TEXT_TOKENIZERS}")
        self.kind, self.state = kind, state
        self._bpe = None
        if kind == "bpe":
            from tokenizers import Tokenizer

            if not state:
                raise ValueError("a bpe caption tokenizer needs its trained state (JSON); "
                                 "train one with train_caption_tokenizer")
            self._bpe = Tokenizer.from_str(state)
            self.vocab_size = self._bpe.get_vocab_size()
        else:
            self.vocab_size = 257  # padding + 256 byte values

    def encode(self, text: str) -> list[int]:
        if self._bpe is None:
            return [b + 1 for b in text.encode("utf-8")]
        return self._bpe.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._bpe is None:
            return [self.encode(t) for t in texts]
        return [e.ids for e in self._bpe.encode_batch(texts)]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids if int(i) != PAD]
        if self._bpe is None:
            return bytes(i - 1 for i in ids).decode("utf-8", errors="replace")
        return self._bpe.decode(ids)

    def to_json(self) -> str:
        """What rebuilds this tokenizer: `CaptionTokenizer(kind, to_json())`."""
        return self.state


def train_caption_tokenizer(captions: list[str], kind: str, vocab_size: int) -> CaptionTokenizer:
    """A caption tokenizer for these captions: byte needs no training; bpe learns merges up to
    `vocab_size` ids (padding and the 256 byte symbols included), fewer when the captions have
    no more to merge."""
    if kind == "byte":
        return CaptionTokenizer("byte")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"text.vocab_size={vocab_size}: a byte-level BPE needs more than 257 "
                         f"ids (padding + 256 bytes) to learn any merge")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(captions, trainer)
    assert bpe.token_to_id("<pad>") == PAD  # the first special token gets id 0
    return CaptionTokenizer("bpe", bpe.to_str())


def left_pad(rows: list[list[int]], length: int) -> np.ndarray:
    """Token rows -> (N, length) int32, each row's tokens at the end (rows longer than
    `length` must have been cut by the caller)."""
    out = np.full((len(rows), length), PAD, dtype=np.int32)
    for i, ids in enumerate(rows):
        if ids:
            out[i, length - len(ids):] = ids
    return out


def describe_caption(text: str, limit: int = 80) -> str:
    """A caption for an error message: quoted, cut to `limit` characters, its characters as
    written (json.dumps' default would print "étoile" as "\\u00e9toile")."""
    return json.dumps(text if len(text) <= limit else text[:limit] + "...", ensure_ascii=False)
