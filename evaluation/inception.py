"""TF-compatible InceptionV3 features: pool3 (FID, P/R, KID), the sFID map and IS logits.

    extractor = InceptionExtractor(weights=None, device="auto")   # weights: see weights.py
    feats = extractor.extract(source.batches(64), total=len(source))
    feats.pool     # (N, 2048) float32   pool_3
    feats.spatial  # (N, 2023) float32   mixed_6/conv, first 7 channels, NHWC order (sFID)
    feats.logits   # (N, 1008) float32   pool3 . W, no bias (IS); None without logits weights

The network is torch-fidelity's `FeatureExtractorInceptionV3`: uint8 input, TF1-exact bilinear
resize to 299 and (x - 128) / 128 inside, so the images are never resized or normalised here.
It always runs in float32 with TF32 off and autocast disabled, on the GPU when there is one.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from common.dist import pick_device
from evaluation.weights import load_inception_state, resolve_weights

# ADM reads `mixed_6/conv:0` (TF scope mixed_6 = torchvision Mixed_6d; its `conv` is the 1x1
# branch, after ReLU), 17x17x192 in NHWC, and keeps channels [..., :7]: 17 * 17 * 7 = 2023.
SPATIAL_LAYER = "Mixed_6d.branch1x1"
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS


@dataclass
class Features:
    pool: np.ndarray  # (N, 2048) pool_3 features
    spatial: np.ndarray | None  # (N, 2023) sFID features, when asked for
    logits: np.ndarray | None  # (N, 1008) unbiased logits, when the weights have them


@contextlib.contextmanager
def exact_float32(device: torch.device) -> Iterator[None]:
    """No TF32 and no autocast inside; the previous global flags are restored on exit."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.autocast(device.type, enabled=False), torch.inference_mode():
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _full_state(state: dict[str, torch.Tensor], has_logits: bool) -> dict[str, torch.Tensor]:
    """Complete a torch-fidelity state dict for its strict load: BN counters and, when the
    weights lack the classifier, a NaN one that is never evaluated (logits are not requested)."""
    full = dict(state)
    for key in state:
        if key.endswith(".bn.running_var"):
            full[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    if not has_logits:
        full["fc.weight"] = torch.full((1008, 2048), float("nan"))
        full["fc.bias"] = torch.full((1008,), float("nan"))
    return full


def build_network(state: dict[str, torch.Tensor], has_logits: bool, source: str) -> torch.nn.Module:
    """torch-fidelity's InceptionV3 holding `state`; it never sees a path, so never downloads.

    Its constructor downloads when given no weights path and otherwise calls
    torch.load on it with weights_only disabled. So it gets an in-memory buffer that this function
    has just written from tensors, which unpickles nothing that came from outside.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    buffer = io.BytesIO()
    torch.save(_full_state(state, has_logits), buffer)
    buffer.seek(0)
    features = ["2048", "logits_unbiased"] if has_logits else ["2048"]
    try:
        return FeatureExtractorInceptionV3("inception-v3-compat", features,
                                           feature_extractor_weights_path=buffer)
    except RuntimeError as e:  # strict load_state_dict: missing/unexpected keys, shapes
        raise ValueError(f"{source} does not fit torch-fidelity's InceptionV3: "
                         f"{str(e).splitlines()[0][:600]}") from None


class InceptionExtractor:
    """Features of uint8 NHWC image batches (any size; resized to 299 inside the network)."""

    def __init__(self, weights: str | Path | None = None, device: str | torch.device = "auto"):
        path = resolve_weights(weights)
        state, self.info = load_inception_state(path)
        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.net = build_network(state, self.info.has_logits, str(path)).to(self.device)
        # oneDNN's NHWC convolutions on a CPU: 1.4x the images/s on 2 cores, features equal to 6e-6
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        self.net = self.net.to(memory_format=self.memory_format)
        self._spatial: torch.Tensor | None = None
        layer = self.net.get_submodule(SPATIAL_LAYER)
        layer.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, _module, _inputs, output: torch.Tensor) -> None:
        b = output.shape[0]
        nhwc = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # (B, 17, 17, 7)
        self._spatial = nhwc.reshape(b, -1)  # (B, 2023)

    def forward_batch(self, images: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """One batch, uint8 (B, H, W, 3) -> {'pool', 'spatial'[, 'logits']} float32 on CPU."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"expected uint8 images (B, H, W, 3), got {x.dtype} {tuple(x.shape)}")
        x = x.permute(0, 3, 1, 2).contiguous().to(self.device)  # (B, 3, H, W)
        with exact_float32(self.device):
            out = self.net(x)
        result = {"pool": out[0].float().cpu(), "spatial": self._spatial.float().cpu()}
        if self.info.has_logits:
            result["logits"] = out[1].float().cpu()
        self._spatial = None
        return result

    def extract(self, batches: Iterable[np.ndarray], total: int | None = None,
                spatial: bool = True, desc: str = "inception features", progress: bool = True
                ) -> Features:
        """Run every batch; keep pool features, the sFID map if `spatial`, logits if present."""
        pools, spatials, logits = [], [], []
        bar = tqdm(total=total, desc=desc, unit="img", disable=not progress)
        for batch in batches:
            out = self.forward_batch(batch)
            pools.append(out["pool"].numpy())
            if spatial:
                spatials.append(out["spatial"].numpy())
            if "logits" in out:
                logits.append(out["logits"].numpy())
            bar.update(len(batch))
        bar.close()
        if not pools:
            raise ValueError(f"{desc}: no images to extract features from")
        return Features(pool=np.concatenate(pools),
                        spatial=np.concatenate(spatials) if spatial else None,
                        logits=np.concatenate(logits) if logits else None)
