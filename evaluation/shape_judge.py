"""The judge of prompt following on `shapes` (evaluation/prompt_follow.py): what one image
shows, read back from its pixels. The attributes of the procedural data are simple enough that
this needs no network, no download and no GPU. Each image gets a background (border pixels), a
foreground (pixels far from the background), and from the largest foreground blob a colour, a
size (area), a position (centre against the dataset's region boundaries) and a shape (nearest
neighbour among shapes rendered by dataset.shapes at the image's resolution). An image with no
foreground gets "none" for the four object attributes, which never matches a caption.

The judge is exact on rendered ground truth (tests/test_prompt_follow.py), so what a model loses
is the model's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from itertools import product

import numpy as np

from dataset.shapes import (BACKGROUNDS, CLASSES, EXTENT, FILL_COLORS, MARGIN, MAX_ROTATION_DEG,
                            POSITIONS, SIZES, check_resolution, draw, shape_attributes)

ATTRIBUTES = ("shape", "color", "size", "position", "background")
VALUES = {"shape": CLASSES, "color": tuple(FILL_COLORS), "size": tuple(SIZES),
          "position": POSITIONS, "background": tuple(BACKGROUNDS)}
NONE = "none"  # the verdict for an object attribute of an image with no foreground

# Fill colours are at least 110 RGB units from their background (dataset.shapes); 40 keeps
# a jittered fill on a background gradient well inside, and sampling noise well outside.
FOREGROUND_DISTANCE = 40.0
MIN_OBJECT_FRACTION = 0.004  # a tenth of the smallest shape's area: less is specks, not an object
FEATURE_SIDE = 16  # shape crops are compared at 16x16: enough for a 32-px star's points


# ------------------------------------------------------------------------------ pixels

def _nearest(rgb: np.ndarray, table: dict) -> str:
    names = list(table)
    return names[int(np.argmin([math.dist(rgb, table[n]) for n in names]))]


def _background(image: np.ndarray) -> tuple[str, np.ndarray]:
    """(name, plane (H, W, 3) float): a plane fitted to the border pixels, since jittered
    backgrounds are linear gradients; points far off the plane (a blob touching the border) are
    dropped and the plane refitted."""
    h, w, _ = image.shape
    ys, xs = np.mgrid[0:h, 0:w]
    design = np.stack([np.ones((h, w)), (xs + 0.5) / w - 0.5, (ys + 0.5) / h - 0.5], axis=-1)
    ring = np.ones((h, w), dtype=bool)
    ring[1:-1, 1:-1] = False
    a, values = design[ring], image[ring].astype(np.float64)  # (P, 3) each
    keep = np.ones(len(values), dtype=bool)
    for _ in range(2):
        coef = np.linalg.lstsq(a[keep], values[keep], rcond=None)[0]  # (3 terms, 3 channels)
        off = np.linalg.norm(values - a @ coef, axis=1)
        keep = off <= max(3.0 * float(np.median(off)), 8.0)  # at least half the ring stays
    return _nearest(coef[0], BACKGROUNDS), design @ coef  # coef[0]: the level at the centre


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of `mask` (bool (H, W)). Each pixel holds the index of
    a pixel of its component, lowered from its neighbours and by following those indices (so a
    long ring needs a few rounds, not one per pixel of its length)."""
    h, w = mask.shape
    empty = h * w
    label = np.where(mask, np.arange(empty).reshape(h, w), empty)
    while True:
        padded = np.pad(label, 1, constant_values=empty)
        low = label
        for dy, dx in product(range(3), range(3)):
            low = np.minimum(low, padded[dy:dy + h, dx:dx + w])
        flat = np.append(np.where(mask, low, empty).ravel(), empty)
        while not np.array_equal(flat[flat], flat):
            flat = flat[flat]
        low = flat[:-1].reshape(h, w)
        if np.array_equal(low, label):
            break
        label = low
    return label == np.bincount(label[mask]).argmax()


def _dilate(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    padded = np.pad(mask, 1)
    return np.logical_or.reduce([padded[dy:dy + h, dx:dx + w]
                                 for dy, dx in product(range(3), range(3))])


def _foreground(image: np.ndarray, plane: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(soft coverage (H, W) of the largest blob and its anti-aliased rim, fill rgb (3,)), or
    None when nothing stands out. Coverage is each pixel's position between the background and
    the fill colour, so anti-aliased edges count by how much of them the shape covers."""
    h, w, _ = image.shape
    diff = image - plane  # (H, W, 3)
    dist = np.linalg.norm(diff, axis=-1)
    min_pixels = max(3, MIN_OBJECT_FRACTION * h * w)
    pick = dist > FOREGROUND_DISTANCE
    # The largest blob of anything off the background gives the fill; then the pixels of that
    # fill's largest blob, found again with it, give the final fill and coverage.
    pick = _largest_component(pick) if pick.sum() >= min_pixels else pick
    for _ in range(2):
        if pick.sum() < min_pixels:
            return None
        strong = pick & (dist >= 0.8 * np.percentile(dist[pick], 90))  # interior, not the rim
        fill = np.median(image[strong], axis=0)
        towards = fill - plane
        cover = (diff * towards).sum(-1) / np.maximum((towards ** 2).sum(-1), 40.0 ** 2)
        mask = (cover >= 0.5) & (dist > FOREGROUND_DISTANCE)
        if mask.sum() < min_pixels:
            return None
        pick = _largest_component(mask)
    return np.clip(cover, 0.0, 1.0) * _dilate(pick), fill


def _crop_feature(cover: np.ndarray) -> np.ndarray:
    """The blob's coverage in the square around its bounding box, resampled to FEATURE_SIDE^2
    by averaging bilinear samples (several per cell, so big images do not alias)."""
    ys, xs = np.nonzero(cover >= 0.5)
    cx, cy = (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2
    side = max(xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) + 1.0  # + the rim
    sub = max(1, math.ceil(side / FEATURE_SIDE))
    n = FEATURE_SIDE * sub
    grid = (np.arange(n) + 0.5) / n - 0.5
    padded = np.pad(cover, 1)  # zero outside the image
    h, w = padded.shape

    def taps(centre, limit):  # pixel centres sit at i + 0.5, and padding shifts them by 1
        pos = centre + grid * side - 0.5 + 1
        i0 = np.clip(np.floor(pos).astype(int), 0, limit - 2)
        return i0, np.clip(pos - i0, 0.0, 1.0)

    (x0, fx), (y0, fy) = taps(cx, w), taps(cy, h)
    top = padded[y0][:, x0] * (1 - fx) + padded[y0][:, x0 + 1] * fx  # (n, n)
    bottom = padded[y0 + 1][:, x0] * (1 - fx) + padded[y0 + 1][:, x0 + 1] * fx
    sampled = top * (1 - fy)[:, None] + bottom * fy[:, None]
    return sampled.reshape(FEATURE_SIDE, sub, FEATURE_SIDE, sub).mean(axis=(1, 3)).ravel()


def _centroid(cover: np.ndarray) -> np.ndarray:
    """(x, y) in pixels, pixel centres at i + 0.5."""
    ys, xs = np.mgrid[0:cover.shape[0], 0:cover.shape[1]]
    return np.array([(cover * (xs + 0.5)).sum(), (cover * (ys + 0.5)).sum()]) / cover.sum()


# ------------------------------------------------------------------------------ references

@dataclass(frozen=True)
class _References:
    features: np.ndarray  # (M, FEATURE_SIDE^2) coverage crops
    labels: np.ndarray  # (M,) class index
    offsets: np.ndarray  # (M, 2) centroid - centre, in shape radii (the crescent's is not 0)
    areas: np.ndarray  # (classes, sizes): area at each size's middle radius, fraction of image


REF_ROTATIONS = (-MAX_ROTATION_DEG, -MAX_ROTATION_DEG / 2, 0.0, MAX_ROTATION_DEG / 2,
                 MAX_ROTATION_DEG)
REF_PHASES = (0.0, 0.5)  # centre on a pixel corner (the non-jittered lattice) or a pixel centre


@functools.lru_cache(maxsize=4)
def references(resolution: int) -> _References:
    """White-on-black renders by dataset.shapes.draw of every class at each size's middle
    radius and rotation and two sub-pixel phases; built once per resolution."""
    check_resolution(resolution)
    radii = [0.5 * sum(SIZES[s]) for s in SIZES]
    feats, labels, offsets = [], [], []
    areas = np.zeros((len(CLASSES), len(SIZES)))
    for k in range(len(CLASSES)):
        base = dataclasses.replace(shape_attributes(k), fill_rgb=(255, 255, 255),
                                   background_rgb=(0, 0, 0), gradient=(0.0, 0.0))
        for (j, radius), rotation, phase in product(enumerate(radii), REF_ROTATIONS, REF_PHASES):
            centre = 0.5 + phase / resolution
            attrs = dataclasses.replace(base, radius=radius, center=(centre, centre),
                                        rotation_deg=rotation)
            cover = draw(attrs, resolution)[..., 0] / 255.0
            feats.append(_crop_feature(cover))
            labels.append(k)
            offsets.append((_centroid(cover) / resolution - centre) / radius)
            if rotation == 0.0 and phase == 0.0:
                areas[k, j] = cover.sum() / resolution ** 2
    return _References(np.stack(feats), np.array(labels), np.stack(offsets), areas)


# ------------------------------------------------------------------------------ the judge

def _region(centre: float, lo: float) -> int:
    """Which third (0, 1, 2) of the range where the shape fits holds `centre`: the boundaries
    dataset.shapes places shapes by. A blob too big to fit falls back to thirds of the image."""
    third = (1.0 - 2.0 * lo) / 3.0
    if third < 0.05:
        lo, third = 0.0, 1.0 / 3.0
    return int(np.clip(math.floor((centre - lo) / third), 0, 2))


def judge(image: np.ndarray) -> dict:
    """What one uint8 (H, W, 3) image shows: {"shape", "color", "size", "position",
    "background"}, each a value of VALUES or "none" (no foreground) for all but background."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 \
            or image.shape[0] != image.shape[1]:
        raise ValueError(f"the judge takes square uint8 (H, W, 3) images, got {image.dtype} "
                         f"{image.shape}")
    resolution = check_resolution(image.shape[0])
    background, plane = _background(image)
    found = _foreground(image, plane)
    if found is None:
        return {**{a: NONE for a in ATTRIBUTES}, "background": background}
    cover, fill = found
    refs = references(resolution)
    nearest = int(np.argmin(((refs.features - _crop_feature(cover)) ** 2).sum(axis=1)))
    k = int(refs.labels[nearest])
    area = cover.sum() / resolution ** 2
    j = int(np.argmin(np.abs(np.log(area / refs.areas[k]))))
    # area grows with the radius squared, so this is the radius the blob would be drawn with
    radius = 0.5 * sum(SIZES[list(SIZES)[j]]) * math.sqrt(area / refs.areas[k, j])
    cx, cy = _centroid(cover) / resolution - refs.offsets[nearest] * radius
    lo = EXTENT[CLASSES[k]] * radius + MARGIN
    return {"shape": CLASSES[k], "color": _nearest(fill, FILL_COLORS), "size": list(SIZES)[j],
            "position": POSITIONS[3 * _region(cy, lo) + _region(cx, lo)],
            "background": background}
