"""Image utilities shared by the whole project: ADM center crop, loading, tensor conversion, PNGs.

Pixel convention everywhere in argen: uint8 images are HWC (or NHWC) numpy arrays in [0, 255];
model-side images are float32 tensors CHW (or NCHW) in [-1, 1]. `to_tensor` and `to_uint8` are
the only two crossings, so the rounding rule is defined once.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from common.io import atomic_path

# Lower-case suffixes a class folder may hold; anything else (captions, .DS_Store, temp files) is
# ignored rather than fed to PIL.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ImageReadError(ValueError):
    """An image file that exists but cannot be decoded (corrupt, truncated, not an image)."""


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def adm_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Center crop to `resolution` x `resolution` exactly as the ADM ImageNet FID tables did.

    The repeated BOX halving before the final BICUBIC resize matters: it is what the reference
    statistics were computed with, and a single bicubic downscale aliases differently, which
    moves FID.
    """
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of pixels, got {resolution}")
    while min(img.size) >= 2 * resolution:
        img = img.resize((img.width // 2, img.height // 2), resample=Image.BOX)
    scale = resolution / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), resample=Image.BICUBIC)
    top = (img.height - resolution) // 2
    left = (img.width - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def load_image(path: str | Path, resolution: int) -> np.ndarray:
    """Read an image file as RGB, ADM-center-cropped: uint8 array (R, R, 3).

    Raises FileNotFoundError for a missing file and ImageReadError for one PIL cannot decode.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            # PIL decodes lazily; forcing the decode here makes a truncated file fail now, with
            # its name, instead of later inside a DataLoader worker.
            img.load()
            rgb = img.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageReadError(
            f"cannot read image {path}: {type(e).__name__}: {e}. The file is corrupt, truncated or "
            f"not an image; re-download it or delete it and run again."
        ) from None
    return np.array(adm_center_crop(rgb, resolution), dtype=np.uint8)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) or (N, H, W, 3) -> float32 (3, H, W) or (N, 3, H, W) in [-1, 1]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[-1] != 3:
        raise ValueError(f"to_tensor expects uint8 HWC or NHWC RGB images, got dtype "
                         f"{images.dtype} shape {images.shape}")
    images = np.ascontiguousarray(images)  # torch cannot view negative strides (img[::-1])
    if not images.flags.writeable:  # e.g. np.asarray(PIL image); torch warns on read-only memory
        images = images.copy()
    x = torch.from_numpy(images)
    x = x.permute(2, 0, 1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # (..., 3, H, W)
    return x.float().div(127.5).sub(1.0).contiguous()


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float (3, H, W) or (N, 3, H, W) in [-1, 1] -> uint8 (H, W, 3) or (N, H, W, 3).

    Values outside [-1, 1] (a generator's overshoot) are clamped; rounding is to nearest so that
    `to_uint8(to_tensor(x)) == x` exactly.
    """
    if not torch.is_tensor(images) or images.ndim not in (3, 4) or images.shape[-3] != 3:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"to_uint8 expects a (3, H, W) or (N, 3, H, W) tensor, got {shape}")
    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    x = x.permute(1, 2, 0) if x.ndim == 3 else x.permute(0, 2, 3, 1)  # (..., H, W, 3)
    return x.contiguous().numpy()


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Write a uint8 HWC (RGB or single-channel) array as PNG, atomically (temp file + rename)."""
    image = np.asarray(image)
    hwc = image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3, 4))
    if image.dtype != np.uint8 or not hwc:
        raise ValueError(f"save_png expects a uint8 HWC image, got dtype {image.dtype} "
                         f"shape {image.shape} for {path}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    with atomic_path(path) as tmp:
        # The temp name ends in .tmp, so PIL cannot infer the format from it.
        Image.fromarray(image).save(tmp, format="PNG")
