"""The converters on bad input, called as a user calls them (`main([...])`, `python -m ...`):
files that are not PyTorch checkpoints, pickles holding foreign objects, another released
family's checkpoint, --help, LlamaGen's head count and class count where the shapes cannot
tell them. Every error is one line that names the file and what to do."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from ar.checkpoint import load_generator
from conftest import FIXTURES, ROOT
from convert import llamagen, mar_vae, var, xar

SHARED = FIXTURES.parent
pytestmark = pytest.mark.skipif(not (SHARED / "xar" / "xar_tiny.pt").is_file(),
                                reason=f"fixtures not found at {SHARED} (they sit beside the project)")

# every entry point: (main, words before the path, keys after it that it needs)
ENTRIES = {
    "llamagen gpt": (llamagen.main, ["gpt"], ["image_size=128"]),  # + the fixture's n_head / classes where converted
    "llamagen vq": (llamagen.main, ["vq"], []),
    "var var": (var.main, ["var"], ["tokenizer=no_such_tokenizer.safetensors"]),
    "var vqvae": (var.main, ["vqvae"], []),
    "mar_vae": (mar_vae.main, [], []),
    "xar": (xar.main, [], []),
}
# each family's fixture checkpoint and the command that converts it
FAMILIES = {
    "llamagen gpt": (SHARED / "llamagen" / "llamagen_gpt_c2i_tiny.pt", "python -m convert.llamagen gpt"),
    "llamagen vq": (SHARED / "llamagen" / "llamagen_vq_tiny.pt", "python -m convert.llamagen vq"),
    "var var": (SHARED / "var" / "var_tiny.pth", "python -m convert.var var"),
    "var vqvae": (SHARED / "var" / "var_vqvae_tiny.pth", "python -m convert.var vqvae"),
    "mar_vae": (SHARED / "mar_vae" / "mar_vae_tiny.pt", "python -m convert.mar_vae"),
    "xar": (SHARED / "xar" / "xar_tiny.pt", "python -m convert.xar"),
}
NOT_CONVERTED = {  # released families argen knows but has no converter for
    "LlamaGen text-to-image GPT": SHARED / "llamagen" / "llamagen_gpt_t2i_tiny.pt",
    "RandAR": SHARED / "randar" / "randar_tiny.pt",
    "ARPG": SHARED / "arpg" / "arpg_tiny.pt",
}


def error_of(entry: str, ckpt, tmp_path, *extra: str) -> str:
    """The one-line error `entry` exits with on `ckpt`."""
    main, head, tail = ENTRIES[entry]
    with pytest.raises(SystemExit) as exc:
        main([*head, str(ckpt), f"out={tmp_path / 'out.safetensors'}", *tail, *extra])
    msg = str(exc.value.code)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------ not a checkpoint

@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_empty_file_is_not_a_checkpoint_for_every_entry(entry, tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    msg = error_of(entry, empty, tmp_path)
    assert f"{empty} is not a PyTorch checkpoint" in msg and "empty" in msg, msg


class Payload:
    """Unpickling it would create `marker`: a pickle must be refused without running it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def bad_bytes(kind: str, path, marker) -> None:
    gpt = (SHARED / "llamagen" / "llamagen_gpt_c2i_tiny.pt").read_bytes()
    if kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif kind == "text":
        path.write_text("epoch,loss\n1,0.5\n2,0.4\n")
    elif kind == "lfs pointer":
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    elif kind == "truncated zip":
        path.write_bytes(gpt[: len(gpt) // 2])
    elif kind == "truncated legacy":
        buf = path.with_suffix(".full")
        torch.save({"model": torch.load(io.BytesIO(gpt), weights_only=True)["model"]}, buf,
                   _use_new_zipfile_serialization=False)
        path.write_bytes(buf.read_bytes()[:2000])
    elif kind == "safetensors":
        save_file({"tok_embeddings.weight": torch.zeros(4, 4)}, str(path))
    elif kind == "zip of other files":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes/readme.txt", "not a checkpoint")
    elif kind == "plain pickle":  # protocol 0, a foreign global: not torch's format either
        path.write_bytes(pickle.dumps({"model": Payload(marker)}, protocol=0))


BAD_KINDS = ["random", "text", "lfs pointer", "truncated zip", "truncated legacy", "safetensors",
             "zip of other files", "plain pickle"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_bytes_are_not_a_checkpoint(kind, tmp_path):
    path, marker = tmp_path / "bad.pt", tmp_path / "ran"
    bad_bytes(kind, path, marker)
    msg = error_of("llamagen gpt", path, tmp_path)
    assert f"{path} is not a PyTorch checkpoint (corrupt, truncated, or another kind of file" in msg, msg
    assert "refused" not in msg and "trust" not in msg, msg
    if kind == "safetensors":
        assert "safetensors" in msg
    assert not marker.exists()


@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_random_bytes_are_not_a_checkpoint_for_every_entry(entry, tmp_path):
    path = tmp_path / "noise.pth"
    bad_bytes("random", path, None)
    assert f"{path} is not a PyTorch checkpoint" in error_of(entry, path, tmp_path)


@pytest.mark.parametrize("zipped", [True, False])
def test_foreign_objects_are_refused_and_never_run(zipped, tmp_path):
    marker = tmp_path / "ran"
    state = torch.load(FAMILIES["llamagen gpt"][0], weights_only=True)["model"]
    path = tmp_path / "foreign.pt"
    torch.save({"model": state, "extra": Payload(marker)}, path, _use_new_zipfile_serialization=zipped)
    msg = error_of("llamagen gpt", path, tmp_path)
    assert f"{path}: refused" in msg and "mkdir" in msg and "re-save" in msg, msg
    assert "not a PyTorch checkpoint" not in msg
    assert not marker.exists()


# ------------------------------------------------------------------ the wrong converter

PAIRS = [(entry, family) for entry in ENTRIES for family in FAMILIES if entry != family]


@pytest.mark.parametrize("entry,family", PAIRS, ids=[f"{e}<-{f}" for e, f in PAIRS])
def test_another_familys_checkpoint_names_its_converter(entry, family, tmp_path):
    path, command = FAMILIES[family]
    msg = error_of(entry, path, tmp_path)
    assert str(path) in msg and f"`{command}`" in msg, msg


@pytest.mark.parametrize("name", sorted(NOT_CONVERTED))
def test_known_family_without_converter_is_named(name, tmp_path):
    path = NOT_CONVERTED[name]
    msg = error_of("llamagen gpt", path, tmp_path)
    assert str(path) in msg and name in msg and "no converter" in msg, msg


def test_every_fixture_is_guessed_as_its_own_family():
    from convert.common import guess_family
    for family, (path, command) in FAMILIES.items():
        obj = torch.load(path, weights_only=True)
        found = guess_family(obj.get("model", obj))
        assert found is not None and found.command == command, (family, found)
    for name, path in NOT_CONVERTED.items():
        obj = torch.load(path, weights_only=True)
        found = guess_family(next(v for v in (obj.get("model"), obj.get("state_dict"), obj) if v))
        assert found is not None and found.name == name and not found.command
    assert guess_family({"weight": torch.zeros(1)}) is None


# ------------------------------------------------------------------ --help

HELP = ["convert.var --help", "convert.var -h", "convert.var var --help", "convert.var vqvae --help",
        "convert.llamagen --help", "convert.llamagen gpt --help", "convert.llamagen vq --help",
        "convert.mar_vae --help", "convert.xar --help"]


@pytest.mark.parametrize("command", HELP)
def test_help_prints_and_exits_zero(command):
    run = subprocess.run([sys.executable, "-m", *command.split()], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "python -m convert." in run.stdout and "error:" not in run.stderr + run.stdout


# ------------------------------------------------------------------ LlamaGen: heads, classes

def partial_gpt(path, dim: int, layers: int, rows: int = 1001, args=None):
    """The tensors convert.llamagen reads the architecture from, at width `dim` and depth
    `layers`; the other weights are missing (heads and classes are settled before they are read)."""
    state = {"tok_embeddings.weight": torch.zeros(16, dim),
             "cls_embedding.embedding_table.weight": torch.zeros(rows, dim),
             "layers.0.attention.wqkv.weight": torch.zeros(3 * dim, dim),
             f"layers.{layers - 1}.ffn_norm.weight": torch.zeros(dim)}
    torch.save({"model": state, **({"args": args} if args is not None else {})}, path)
    return path


def test_size_outside_llamagens_table_needs_n_head(tmp_path):
    """Width 256 x 6 layers is argen's AR-Nano (8 heads), not a LlamaGen size: no guessing."""
    path = partial_gpt(tmp_path / "nano.pt", 256, 6)
    msg = error_of("llamagen gpt", path, tmp_path)
    assert str(path) in msg and "n_head=" in msg and "missing keys" not in msg, msg
    given = error_of("llamagen gpt", path, tmp_path, "n_head=4")  # taken: the next check is the keys
    assert "missing keys" in given and "n_head" not in given, given


def test_n_head_contradicting_the_args_is_an_error(tmp_path):
    path = partial_gpt(tmp_path / "b.pt", 768, 12, args=argparse.Namespace(gpt_model="GPT-B"))
    msg = error_of("llamagen gpt", path, tmp_path, "n_head=16")
    assert str(path) in msg and "n_head=16" in msg and "GPT-B" in msg and "12" in msg, msg
    assert "missing keys" in error_of("llamagen gpt", path, tmp_path, "n_head=12")


def gpt_with_rows(tmp_path, rows: int, args=None):
    """The tiny LlamaGen GPT (10 classes + null row) with its class table grown to `rows`."""
    state = dict(torch.load(FAMILIES["llamagen gpt"][0], weights_only=True)["model"])
    table = state["cls_embedding.embedding_table.weight"]
    state["cls_embedding.embedding_table.weight"] = torch.cat([table, table[: rows - len(table)]])
    path = tmp_path / f"rows{rows}.pt"
    torch.save({"model": state, **({"args": args} if args is not None else {})}, path)
    return path


def convert_rows(tmp_path, path, *extra: str):
    """Convert the tiny GPT (4 heads, README: not a LlamaGen size, so n_head= is needed)."""
    main, head, tail = ENTRIES["llamagen gpt"]
    return load_generator(main([*head, str(path), f"out={tmp_path / 'ok.safetensors'}", *tail,
                                "n_head=4", *extra]))


def test_ambiguous_class_table_names_num_classes(tmp_path):
    """12 rows: 11 classes + null row, or 12 classes without one; nothing in the file says which."""
    path = gpt_with_rows(tmp_path, 12)
    msg = error_of("llamagen gpt", path, tmp_path)
    assert str(path) in msg and "12 rows" in msg and "num_classes=11" in msg, msg
    assert convert_rows(tmp_path, path, "num_classes=11").spec.num_classes == 11


def test_class_count_from_the_args(tmp_path):
    path = gpt_with_rows(tmp_path, 12, argparse.Namespace(num_classes=11))
    assert convert_rows(tmp_path, path).spec.num_classes == 11
    msg = error_of("llamagen gpt", path, tmp_path, "num_classes=10")
    assert "num_classes=10" in msg and "args" in msg and "11" in msg, msg


@pytest.mark.parametrize("args", [argparse.Namespace(num_classes=12),
                                  argparse.Namespace(num_classes=12, class_dropout_prob=0.0),
                                  argparse.Namespace(class_dropout_prob=0.0)])
def test_table_without_null_row_is_refused_not_cut(args, tmp_path):
    """Trained without class dropout: all 12 rows are classes; dropping the last would lose one."""
    msg = error_of("llamagen gpt", gpt_with_rows(tmp_path, 12, args), tmp_path)
    assert "12 classes" in msg and "null" in msg, msg


def test_num_classes_equal_to_the_rows_is_refused(tmp_path):
    msg = error_of("llamagen gpt", gpt_with_rows(tmp_path, 12), tmp_path, "num_classes=12")
    assert "12 classes" in msg and "null" in msg, msg


def test_released_tables_need_no_keys_and_the_fixture_names_its_own(tmp_path):
    """1001 rows (ImageNet's 1000 classes + null row) of a LlamaGen size convert as before; the
    tiny fixture (no LlamaGen size, 11 rows) converts once given its heads and classes."""
    msg = error_of("llamagen gpt", partial_gpt(tmp_path / "b.pt", 768, 12), tmp_path)
    assert "missing keys" in msg, msg  # past the class and head checks
    assert "num_classes=10" in error_of("llamagen gpt", FAMILIES["llamagen gpt"][0], tmp_path, "n_head=4")
    assert convert_rows(tmp_path, FAMILIES["llamagen gpt"][0], "num_classes=10").spec.num_classes == 10
