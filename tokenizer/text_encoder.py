"""Frozen text-encoder features of captions, from a local transformers folder.

Text-to-image generators condition on a caption through a frozen text encoder's per-token
features used as a prefix (LlamaGen t2i: FLAN-T5-XL's encoder, up to 120 tokens). Users bring
the encoder as a folder (config.json + weights + tokenizer files); we run transformers' own
classes on it, never reimplement them, and never reach a hub (local_files_only=True).
Supported: T5-family models (model_type t5, mt5, umt5: the encoder only, so a full seq2seq
folder such as FLAN-T5's works and its decoder is left unread) and CLIP text encoders
(model_type clip: its text_config; clip_text_model).

Layout contract of `TextEncoder.features` (generators and caches rely on it): a (N, T, C) float16
array with T = max_tokens; caption i's n_i token features (special tokens included: T5's </s>,
CLIP's BOS and EOS) are LEFT-padded, filling rows [T - n_i, T), and rows [0, T - n_i) are exactly
zero; lengths[i] = n_i. Left padding puts every caption's last token next to the first image
token, as LlamaGen's prefix does. The empty caption "" gives the features of the special tokens
alone: the null condition for classifier-free guidance.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from common.io import sha256_file

# model_type in config.json -> (kind, the transformers class that runs its text encoder)
SUPPORTED = {
    "t5": ("t5", "T5EncoderModel"),
    "mt5": ("t5", "MT5EncoderModel"),
    "umt5": ("t5", "UMT5EncoderModel"),
    "clip": ("clip", "CLIPTextModel"),
    "clip_text_model": ("clip", "CLIPTextModel"),
}
# transformers' own order of preference when a folder holds more than one
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# the files that carry a vocabulary (tokenizer_config.json alone does not: transformers 5 then
# builds a tokenizer with an empty vocabulary and no error, mapping every word to <unk>)
VOCAB_FILES = ("tokenizer.json", "spiece.model", "vocab.json")
TOKENIZER_FILES = VOCAB_FILES + ("merges.txt", "tokenizer_config.json",
                                 "special_tokens_map.json", "added_tokens.json")
OVERFLOW = ("error", "truncate")


class TextEncoder:
    """A frozen text encoder and its tokenizer; see the module docstring for the layout."""

    def __init__(self, path: Path, model, tokenizer, model_type: str, channels: int,
                 max_positions: int | None):
        self.path = path
        self.model = model
        self.tokenizer = tokenizer
        self.model_type = model_type
        self.kind = SUPPORTED[model_type][0]  # "t5" | "clip"
        self.channels = channels  # feature width C
        self.max_positions = max_positions  # CLIP's learned positions; None: T5 (relative)
        self.device = next(model.parameters()).device
        self._sha256: dict[str, str] = {}  # hashed on first identity(): a large model takes a while

    def identity(self) -> dict:
        """What identifies these features, for a cache to detect a changed encoder: `sha256`
        covers the weight files, `tokenizer_sha256` the tokenizer files."""
        if not self._sha256:
            folder = self.path
            self._sha256 = {"sha256": _files_sha256(folder, weight_files(folder)),
                            "tokenizer_sha256": _files_sha256(folder, _tokenizer_files(folder))}
        return {"path": str(self.path), "model_type": self.model_type, "kind": self.kind,
                "channels": self.channels, **self._sha256}

    def count_tokens(self, captions: list[str]) -> list[int]:
        """Tokens per caption as `features` would encode them untruncated (special tokens
        included)."""
        return [len(ids) for ids in self._tokenize(_check_captions(captions))]

    def features(self, captions: list[str], max_tokens: int, batch_size: int = 64,
                 overflow: str = "error") -> tuple[np.ndarray, np.ndarray]:
        """(features (N, T, C) float16, lengths (N,) int32) with T = max_tokens, left-padded
        with exact zeros. A caption over the limit raises ValueError (overflow="error") or keeps
        its first tokens, closing special token included (overflow="truncate", as LlamaGen's
        tokenizer call with truncation=True does; the caller warns)."""
        captions = _check_captions(captions)
        if max_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_tokens={max_tokens} and batch_size={batch_size} must be >= 1")
        ids = self._token_ids(captions, max_tokens, overflow)
        lengths = np.array([len(x) for x in ids], dtype=np.int32)  # (N,)
        out = np.zeros((len(ids), max_tokens, self.channels), dtype=np.float16)  # (N, T, C)
        order = np.argsort(-lengths, kind="stable")  # like lengths batched together: less padding
        for start in range(0, len(order), batch_size):
            rows = [int(i) for i in order[start:start + batch_size] if lengths[i] > 0]
            if not rows:  # a tokenizer without special tokens gives "" no tokens: all zeros
                continue
            hidden = self._encode([ids[i] for i in rows])  # (B, L, C) float32
            for b, i in enumerate(rows):
                n = lengths[i]
                out[i, max_tokens - n:] = hidden[b, :n]
            self._check_finite(out, rows, captions)
        return out, lengths

    def _tokenize(self, captions: list[str], max_length: int | None = None) -> list[list[int]]:
        if not captions:
            return []
        with _quiet_transformers():  # its "longer than model_max_length" warning: we check lengths
            enc = self.tokenizer(captions, add_special_tokens=True,
                                 truncation=max_length is not None, max_length=max_length)
        return [list(x) for x in enc["input_ids"]]

    def _token_ids(self, captions: list[str], max_tokens: int, overflow: str) -> list[list[int]]:
        if overflow not in OVERFLOW:
            raise ValueError(f"overflow={overflow!r}; expected one of {list(OVERFLOW)}")
        limit = max_tokens if self.max_positions is None else min(max_tokens, self.max_positions)
        ids = self._tokenize(captions)
        over = [i for i, x in enumerate(ids) if len(x) > limit]
        if over and overflow == "error":
            raise ValueError(self._overflow_message(captions, ids, over, max_tokens, limit))
        cut = self._tokenize([captions[i] for i in over], max_length=limit)
        for i, x in zip(over, cut):
            if len(x) > limit:  # the tokenizer gives up when its special tokens do not fit
                specials = self.tokenizer.num_special_tokens_to_add()
                raise ValueError(f"cannot truncate caption {i} {_short(captions[i])!r} to "
                                 f"{limit} tokens: {self.path}'s tokenizer adds {specials} "
                                 f"special tokens to each caption; raise max_tokens")
            ids[i] = x
        return ids

    def _overflow_message(self, captions, ids, over, max_tokens, limit) -> str:
        i = over[0]
        why = f"max_tokens={max_tokens}"
        if limit < max_tokens:
            why = f"the {self.max_positions} positions of {self.path}'s CLIP encoder"
        others = f" ({len(over)} of {len(captions)} captions are over)" if len(over) > 1 else ""
        return (f"caption {i} {_short(captions[i])!r} has {len(ids[i])} tokens, over the limit "
                f"of {limit} ({why}){others}; shorten it, raise max_tokens, or pass "
                f"overflow='truncate' to keep the first {limit} tokens of each")

    @torch.no_grad()
    def _encode(self, ids: list[list[int]]) -> np.ndarray:
        """The encoder's last hidden state (B, L, C) of a batch, L = its longest caption."""
        # padded on the RIGHT whatever the tokenizer's padding_side: CLIP's positions are
        # absolute, so a caption must start at position 0 to match its features alone; the
        # attention mask keeps the pads out of T5's bidirectional attention
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        longest = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), longest), pad, dtype=torch.long)  # (B, L)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)  # (B, L)
        for b, x in enumerate(ids):
            input_ids[b, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[b, :len(x)] = 1
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device))
        return out.last_hidden_state.float().cpu().numpy()  # (B, L, C)

    def _check_finite(self, out: np.ndarray, rows: list[int], captions: list[str]) -> None:
        # float16 storage overflows above 65504, and T5 run in float16 is known to produce inf
        bad = [i for i in rows if not np.isfinite(out[i]).all()]
        if bad:
            raise ValueError(f"{self.path}: the features of caption {bad[0]} "
                             f"{_short(captions[bad[0]])!r} are not finite in float16 (encoder "
                             f"dtype {self.model.dtype}); load it with dtype=torch.float32 or "
                             f"torch.bfloat16")


def _check_captions(captions) -> list[str]:
    # a bare string would otherwise be read as a list of one-character captions
    if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
        raise TypeError(f"captions must be a list of strings, got {type(captions).__name__}; "
                        f"wrap a single caption as [caption]")
    for i, c in enumerate(captions):
        if not isinstance(c, str):
            raise TypeError(f"caption {i} is {c!r} ({type(c).__name__}), not a string; use \"\" "
                            f"for an empty caption")
    return list(captions)


def _short(text: str, keep: int = 60) -> str:
    return text if len(text) <= keep else text[:keep] + "..."


@contextmanager
def _quiet_transformers():
    """Silence transformers' logging and progress bars for a moment: its load report lists, as
    a warning, the decoder or vision weights we leave out on purpose (missing weights, the
    case that matters, are checked in `_load_model`)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def weight_files(folder: Path) -> list[Path]:
    """The weight files transformers would read from `folder` (an index and its shards)."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a weight index (JSON with a weight_map) ({e})") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} lists shards missing from {folder}: {missing[:5]}; "
                                    f"copy the whole model folder")
        return [path] + [folder / s for s in shards]
    present = sorted(p.name for p in folder.iterdir())
    raise FileNotFoundError(f"{folder}: no weights file; expected one of {list(WEIGHT_FILES)}, "
                            f"found {present[:12]}; copy the model's weights into the folder")


def _check_readable(files: list[Path]) -> None:
    """Each safetensors weight file's header and extent (a truncated copy fails here, named,
    rather than inside transformers with no file name)."""
    from safetensors import safe_open

    for path in files:
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as e:  # SafetensorError is no OSError/ValueError subclass
            raise ValueError(f"{path}: not a readable safetensors file, truncated or corrupt "
                             f"({e}); copy the model folder again") from None


def _tokenizer_files(folder: Path) -> list[Path]:
    return [folder / n for n in TOKENIZER_FILES if (folder / n).is_file()]


def _files_sha256(folder: Path, files: list[Path]) -> str:
    # each file's name and digest: a renamed or re-sharded file set changes the hash too
    lines = [f"{p.relative_to(folder)} {sha256_file(p)}" for p in files]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _check_folder(path: str | Path) -> Path:
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"text encoder folder {folder} does not exist; pass a local "
                                f"folder with config.json, weights and tokenizer files "
                                f"(nothing is downloaded)")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file; pass the folder that holds the text encoder's "
                         f"config.json, weights and tokenizer files (e.g. {folder.parent})")
    if not (folder / "config.json").is_file():
        hint = ""
        if (folder / "model_index.json").is_file():  # a diffusers pipeline
            hint = (f"; it looks like a diffusers pipeline: pass {folder / 'text_encoder'} "
                    f"with the files of {folder / 'tokenizer'} copied into it")
        raise FileNotFoundError(f"{folder} has no config.json: not a transformers model "
                                f"folder{hint}")
    return folder.resolve()


def _read_model_type(folder: Path) -> str:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED:
        found = (f"model_type {model_type!r} (architectures {config.get('architectures')})"
                 if isinstance(config, dict) else f"a JSON {type(config).__name__}")
        raise ValueError(f"{path}: {found} is not a supported text encoder; supported "
                         f"model_type: {sorted(SUPPORTED)} (T5 family: the encoder is used; "
                         f"CLIP: the text model); pass a T5 or CLIP text encoder's folder")
    return model_type


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not any((folder / n).is_file() for n in VOCAB_FILES):
        hint = ""
        if (folder.parent / "tokenizer").is_dir():  # a diffusers pipeline's text_encoder folder
            hint = f" (a diffusers pipeline keeps them in {folder.parent / 'tokenizer'})"
        raise FileNotFoundError(f"{folder}: no tokenizer files; expected one of "
                                f"{list(VOCAB_FILES)}; copy the encoder's tokenizer files into "
                                f"the folder{hint}")
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; all mean the same to the user
        raise ValueError(f"{folder}: transformers could not load its tokenizer "
                         f"({type(e).__name__}: {e}); check the tokenizer files") from e


def _load_model(folder: Path, model_type: str, dtype: torch.dtype):
    import transformers

    class_name = SUPPORTED[model_type][1]
    cls = getattr(transformers, class_name)
    try:
        with _quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
            if model_type == "clip":  # a whole CLIP model: run its text tower only
                config = config.text_config
            model, info = cls.from_pretrained(str(folder), config=config, dtype=dtype,
                                              local_files_only=True, weights_only=True,
                                              output_loading_info=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{folder}: transformers could not load it as {class_name} "
                         f"({type(e).__name__}: {e})") from e
    missing = sorted(info["missing_keys"])
    if missing:  # transformers would leave them randomly initialised, with only a warning
        raise ValueError(f"{folder}: its weights lack {len(missing)} of the {class_name} "
                         f"parameters (e.g. {missing[:3]}); the weights do not match config.json "
                         f"or are incomplete; copy the model folder again")
    return model


def load_text_encoder(path: str | Path, device: str | torch.device = "cpu",
                      dtype: torch.dtype = torch.float32) -> TextEncoder:
    """A frozen TextEncoder (eval mode, no grads) from a local transformers folder: a T5-family
    or CLIP model's config.json, weights and tokenizer files. Nothing is downloaded."""
    # transformers is no argen dependency: only text conditioning needs it
    if importlib.util.find_spec("transformers") is None:
        raise ImportError("text encoders need the transformers package: pip install "
                          "transformers sentencepiece")
    folder = _check_folder(path)
    model_type = _read_model_type(folder)
    _check_readable(weight_files(folder))  # named errors before transformers' own
    tokenizer = _load_tokenizer(folder)
    model = _load_model(folder, model_type, dtype)
    config = model.config
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"{folder}: its tokenizer has {len(tokenizer)} tokens but the encoder "
                         f"embeds only {config.vocab_size} (config.json vocab_size); the "
                         f"tokenizer files belong to another model")
    kind = SUPPORTED[model_type][0]
    # CLIP's positions are learned, so they cap a caption's tokens; T5's are relative
    max_positions = config.max_position_embeddings if kind == "clip" else None
    channels = config.d_model if kind == "t5" else config.hidden_size
    model = model.eval().requires_grad_(False).to(device)
    return TextEncoder(folder, model, tokenizer, model_type, channels, max_positions)
