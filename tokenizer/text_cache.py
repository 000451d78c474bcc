"""The caption side of a code cache: caption tokens (unified text + image sequence) or a frozen
text encoder's features (prefix), one row per cached image, written by `tokenizer.encode` with
`text.kind=...` into OUT/text/:

    meta.json       written last (its presence means complete): kind "tokens" | "features",
                    max_tokens T, count, the sha256 of captions.jsonl it was made from, how many
                    captions were cut, and the tokenizer (tokens) or the encoder (features)
    tokenizer.json  tokens, bpe: the trained caption tokenizer (`tokenizers` JSON)
    tokens.npy      tokens: int32 (N, T), left-padded with id 0 (tokenizer/text.py)
    features.npy    features: float16 (N, T, C), left-padded with zero rows
    lengths.npy     int32 (N,): each caption's tokens before padding (after any cut)
    null.npy        the empty caption's row: (T,) tokens or (T, C) features: what a dropped
                    caption (classifier-free guidance) is replaced by

Captions longer than T are cut to their first T tokens with a warning (meta.json "truncated");
T defaults to the longest caption (features: at most 120 tokens, LlamaGen's T5 length). Prompts
at sampling time are not cut: a prompt longer than the model's T is an error.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import ConfigError, check_fields
from common.io import atomic_save_npy, atomic_write_text, make_folder, sha256_file
from tokenizer.text import left_pad, train_caption_tokenizer

TEXT_DIR = "text"
TEXT_KINDS = ("none", "byte", "bpe", "encoder")
FEATURE_TOKENS_CAP = 120  # LlamaGen t2i's T5 length: the default cap for encoder features
REMAKE = ("run the encode command that made the cache again, with its text.kind= (and "
          "text.encoder=): it re-checks the caption files and remakes them; the image codes are kept")


@dataclass
class TextCacheConfig:
    kind: str = "none"  # captions for text-to-image: none | byte | bpe (caption tokens in the sequence) | encoder (a frozen T5/CLIP's features, text.encoder)
    max_tokens: int = 0  # caption length T; 0: the longest caption (encoder: at most 120); longer captions are cut, with a warning
    vocab_size: int = 512  # kind=bpe: vocabulary size (padding and the 256 bytes included)
    encoder: str = ""  # kind=encoder: a local transformers T5 or CLIP text-encoder folder
    batch_size: int = 64  # kind=encoder: captions per encoder forward

    def validate(self) -> None:
        check_fields(self, "text.", {"kind": TEXT_KINDS, "max_tokens": ">= 0",
                                     "vocab_size": ">= 258", "batch_size": ">= 1"})
        if self.kind == "encoder" and not self.encoder:
            raise ConfigError("text.kind=encoder needs text.encoder=FOLDER: a local transformers "
                              "T5 or CLIP text encoder (nothing is downloaded)")


def captions_sha256(out: Path) -> str:
    return sha256_file(out / "captions.jsonl")


def read_captions(out: Path) -> list[str]:
    """The cached images' captions, in cache order; a named error when there are none."""
    path = out / "captions.jsonl"
    if not path.is_file():
        raise ValueError(f"{out} has no captions.jsonl: the dataset it was encoded from has no "
                         f"captions, and a text model needs one per image. Put a captions.jsonl "
                         f"({{\"file\", \"caption\"}} per image) in the dataset root, or make "
                         f"shapes with `python -m dataset.shapes`, and encode again")
    return [json.loads(line)["caption"] for line in path.read_text().splitlines() if line.strip()]


# the temporary files of our atomic writes into OUT/text/ (common.io.atomic_path's names)
_OUR_TEMP = re.compile(r"^\.(?:tokens|features|lengths|null)\.npy\..+\.tmp$|"
                       r"^\.(?:tokenizer|meta)\.json\..+\.tmp$")


def _remove_torn_writes(folder: Path, log) -> None:
    """Temp files a killed write left (the files themselves are re-checked, and remade)."""
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if _OUR_TEMP.match(path.name):
            path.unlink(missing_ok=True)
            if log:
                log.info(f"removed {path}, left by an interrupted write")


def _settings(cfg: TextCacheConfig) -> dict:
    keep = {"kind": cfg.kind, "max_tokens": cfg.max_tokens}
    if cfg.kind == "bpe":
        keep["vocab_size"] = cfg.vocab_size
    if cfg.kind == "encoder":
        keep["encoder"] = str(Path(cfg.encoder).resolve())
    return keep


def _cut(rows: list[list[int]], length: int) -> tuple[list[list[int]], int]:
    """Rows cut to `length` tokens (their first ones), and how many were cut."""
    cut = sum(len(r) > length for r in rows)
    return [r[:length] for r in rows], cut


def write_text_cache(out: str | Path, cfg: TextCacheConfig, device="cpu", log=None,
                     encoder=None) -> dict:
    """Write OUT/text/ for the cache's captions (a no-op when it is already made from the same
    captions and settings and its files are whole); returns its meta.json. `encoder`: the
    text.kind=encoder model, already loaded (else it is loaded from text.encoder here)."""
    out = Path(out)
    captions = read_captions(out)
    folder = out / TEXT_DIR
    _remove_torn_writes(folder, log)
    settings, sha = _settings(cfg), captions_sha256(out)
    old = read_text_meta(out, required=False)
    if old is not None and old.get("settings") == settings and old.get("captions_sha256") == sha:
        broken = text_files_problem(folder, old)
        if broken is None:
            if log:
                log.info(f"caption cache {folder} already complete ({old['count']} captions); "
                         f"nothing to do")
            return old
        if log:
            log.warning(f"caption cache {folder}: {broken}; remaking it")
    make_folder(folder)
    (folder / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten
    if cfg.kind == "encoder":
        facts = _write_features(folder, captions, cfg, device, encoder)
    else:
        facts = _write_tokens(folder, captions, cfg)
    meta = {"settings": settings, "captions_sha256": sha, "count": len(captions), **facts}
    if meta["truncated"] and log:
        log.warning(f"{meta['truncated']} of {len(captions)} captions are longer than "
                    f"{meta['max_tokens']} tokens and were cut to their first {meta['max_tokens']} "
                    f"(raise text.max_tokens to keep them whole)")
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1) + "\n")
    if log:
        log.info(f"wrote {len(captions)} captions as {meta['kind']} (T = {meta['max_tokens']}) to {folder}")
    return meta


def _write_tokens(folder: Path, captions: list[str], cfg: TextCacheConfig) -> dict:
    tok = train_caption_tokenizer(captions, cfg.kind, cfg.vocab_size)
    rows = tok.encode_batch(captions)
    length = cfg.max_tokens or max(1, max(len(r) for r in rows))
    rows, cut = _cut(rows, length)
    atomic_save_npy(folder / "tokens.npy", left_pad(rows, length))
    atomic_save_npy(folder / "lengths.npy", np.array([len(r) for r in rows], dtype=np.int32))
    atomic_save_npy(folder / "null.npy", left_pad([[]], length)[0])
    if tok.kind == "bpe":
        atomic_write_text(folder / "tokenizer.json", tok.to_json())
    return {"kind": "tokens", "max_tokens": length, "truncated": cut,
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size,
                          "file": "tokenizer.json" if tok.kind == "bpe" else None}}


def _write_features(folder: Path, captions: list[str], cfg: TextCacheConfig, device,
                    encoder=None) -> dict:
    if encoder is None:
        from tokenizer.text_encoder import load_text_encoder

        encoder = load_text_encoder(cfg.encoder, device=device)
    counts = encoder.count_tokens(captions)
    length = cfg.max_tokens or min(max(counts), FEATURE_TOKENS_CAP)
    features, lengths = encoder.features(captions, length, batch_size=cfg.batch_size,
                                         overflow="truncate")
    null, _ = encoder.features([""], length)
    atomic_save_npy(folder / "features.npy", features)
    atomic_save_npy(folder / "lengths.npy", lengths.astype(np.int32))
    atomic_save_npy(folder / "null.npy", null[0])
    return {"kind": "features", "max_tokens": length, "truncated": sum(c > length for c in counts),
            "channels": encoder.channels, "encoder": encoder.identity()}


def text_files_problem(folder: Path, meta: dict) -> str | None:
    """What is wrong with the caption cache's files (missing, truncated, another shape than
    meta.json says), or None when every file is whole."""
    count, length = meta.get("count"), meta.get("max_tokens")
    row = (length,) if meta.get("kind") == "tokens" else (length, meta.get("channels"))
    dtype = np.int32 if meta.get("kind") == "tokens" else np.float16
    wanted = {"tokens.npy" if meta.get("kind") == "tokens" else "features.npy": (count, *row),
              "lengths.npy": (count,), "null.npy": row}
    for name, shape in wanted.items():
        try:
            array = np.load(folder / name, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:
            return f"{folder / name} is missing, truncated or corrupt ({str(e).splitlines()[0]})"
        if array.shape != shape or (name != "lengths.npy" and array.dtype != dtype):
            return (f"{folder / name} holds {array.dtype} {array.shape}, not {np.dtype(dtype)} "
                    f"{shape} as its meta.json says")
    file = (meta.get("tokenizer") or {}).get("file")
    if file:
        try:
            json.loads((folder / file).read_text())
        except (OSError, ValueError) as e:
            return f"{folder / file} is missing, truncated or corrupt ({str(e).splitlines()[0]})"
    return None


def read_text_meta(out: str | Path, required: bool = True) -> dict | None:
    """OUT/text/meta.json, checked against the cache's captions; None (or, when required, a
    named error) when the cache has no caption side."""
    out = Path(out)
    path = out / TEXT_DIR / "meta.json"
    if not path.is_file():
        if not required:
            return None
        raise ValueError(f"{out} has no caption cache ({path} missing): a text model trains on "
                         f"caption tokens or features. Encode with text.kind=bpe (or byte, or "
                         f"encoder with text.encoder=FOLDER) to add them; the image codes are kept")
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        if not required:  # the encode run remakes it
            return None
        raise ValueError(f"{path} is corrupt ({e}); {REMAKE}") from None
    if required and (out / "captions.jsonl").is_file() and captions_sha256(out) != meta["captions_sha256"]:
        raise ValueError(f"{path} was made from other captions than {out}/captions.jsonl holds "
                         f"now; run the encode command again to remake it")
    return meta
