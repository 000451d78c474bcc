"""Prompt following on `shapes`, offline: does a sample show what its caption asks for?

GenEval judges a text-to-image model with an object detector; on the procedural `shapes` data
the attributes are simple enough to read back from the pixels, so this judge needs no network,
no download and no GPU. Each image gets a background (border pixels), a foreground (pixels far
from the background), and from the largest foreground blob a colour, a size (area), a position
(centre against the dataset's region boundaries) and a shape (nearest neighbour among shapes
rendered by dataset.shapes at the image's resolution). An image with no foreground gets "none"
for the four object attributes, which never matches a caption.

The judge is exact on rendered ground truth (tests/test_prompt_follow.py), so what a model loses
is the model's. `score` carries each attribute's chance level, and `shuffled_baseline` scores
the images against other images' prompts: what a model that ignores its prompt gets.

    python -m evaluation.prompt_follow npz=runs/x/samples/samples.npz out=prompt_follow.json

The .npz holds arr_0 (uint8 NHWC) and prompts (a unicode array, one caption per image).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np

from common.config import ConfigError, run_cli
from common.io import atomic_write_text
from dataset.shapes import (BACKGROUNDS, CLASSES, EXTENT, FILL_COLORS, MARGIN, MAX_ROTATION_DEG,
                            POSITIONS, SIZES, caption_for, check_resolution, draw,
                            shape_attributes)
from evaluation.inputs import require_npz

ATTRIBUTES = ("shape", "color", "size", "position", "background")
VALUES = {"shape": CLASSES, "color": tuple(FILL_COLORS), "size": tuple(SIZES),
          "position": POSITIONS, "background": tuple(BACKGROUNDS)}
NONE = "none"  # the verdict for an object attribute of an image with no foreground
EXPECTED_FORM = ("'a SIZE COLOR SHAPE PLACE on a BACKGROUND background', e.g. "
                 f"{caption_for('small', 'red', 'triangle', 'top left', 'grey')!r} or "
                 f"{caption_for('large', 'blue', 'ring', 'center', 'black')!r}")

# Fill colours are at least 110 RGB units from their background (dataset.shapes); 40 keeps
# a jittered fill on a background gradient well inside, and sampling noise well outside.
FOREGROUND_DISTANCE = 40.0
MIN_OBJECT_FRACTION = 0.004  # a tenth of the smallest shape's area: less is specks, not an object
FEATURE_SIDE = 16  # shape crops are compared at 16x16: enough for a 32-px star's points


# ------------------------------------------------------------------------------ captions

@functools.lru_cache(maxsize=1)
def _caption_table() -> dict[str, dict]:
    # Every caption there is (8,640): the table is the inverse of caption_for by construction.
    return {caption_for(size, color, shape, position, background):
            {"shape": shape, "color": color, "size": size, "position": position,
             "background": background}
            for size, color, shape, position, background in product(*(
                VALUES[a] for a in ("size", "color", "shape", "position", "background")))}


def _places() -> tuple[str, ...]:
    """The PLACE words of each position, cut out of a caption so they cannot drift from it."""
    head, tail = "a small red circle ", " on a grey background"
    return tuple(caption_for("small", "red", "circle", p, "grey")[len(head):-len(tail)]
                 for p in POSITIONS)


def parse_caption(caption: str) -> dict:
    """The attributes named by a `shapes` caption: {"shape", "color", "size", "position",
    "background"}; the inverse of dataset.shapes.caption_for (case and spacing aside)."""
    found = _caption_table().get(" ".join(str(caption).lower().split()))
    if found is None:
        raise ValueError(f"cannot parse the caption {caption!r}: expected {EXPECTED_FORM}, with "
                         f"SIZE in {VALUES['size']}, COLOR in {VALUES['color']}, SHAPE in "
                         f"{VALUES['shape']}, BACKGROUND in {VALUES['background']} and PLACE "
                         f"in {_places()}")
    return dict(found)


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


# ------------------------------------------------------------------------------ scores

def chance_levels() -> dict:
    """Accuracy of a uniform guess per attribute; all_correct: their product."""
    chance = {a: 1.0 / len(VALUES[a]) for a in ATTRIBUTES}
    chance["all_correct"] = float(np.prod(list(chance.values())))
    return chance


def _check_inputs(images, prompts) -> tuple[np.ndarray, list[dict]]:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} "
                         f"{images.shape}; convert float images with dataset.images.to_uint8")
    prompts = [str(p) for p in prompts]
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts; give one prompt "
                         f"per image, in the same order")
    if not len(images):
        raise ValueError("no images to score; pass at least one image with its prompt")
    wanted = []
    for i, prompt in enumerate(prompts):
        try:
            wanted.append(parse_caption(prompt))
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
    return images, wanted


def score(images: np.ndarray, prompts) -> dict:
    """How often uint8 (N, H, W, 3) images show what their prompts ask: per-attribute accuracy,
    "all_correct" (all five right), "no_object" (fraction with no foreground), "count" and
    "chance" (the accuracy of a uniform guess, to read the others against)."""
    images, wanted = _check_inputs(images, prompts)
    seen = [judge(image) for image in images]
    right = np.array([[s[a] == w[a] for a in ATTRIBUTES] for s, w in zip(seen, wanted)])
    out = {a: float(right[:, i].mean()) for i, a in enumerate(ATTRIBUTES)}
    out["all_correct"] = float(right.all(axis=1).mean())
    out["no_object"] = float(np.mean([s["shape"] == NONE for s in seen]))
    out["count"] = len(images)
    out["chance"] = chance_levels()
    return out


def shuffled_baseline(images: np.ndarray, prompts, seed: int = 0) -> dict:
    """`score` with every image given another image's prompt: what a model that ignores its
    prompt would get (above the uniform chance where the data's attributes are unbalanced)."""
    prompts = [str(p) for p in prompts]
    order = np.random.default_rng(seed).permutation(len(prompts))
    shuffled = list(prompts)
    for i, target in enumerate(order):  # a cycle through a random order: no image keeps its own
        shuffled[target] = prompts[order[(i + 1) % len(order)]]
    return score(images, shuffled)


NO_PROMPTS = ("this .npz has no prompts: it was sampled from a class-conditional model; "
              "prompt-following needs samples from a text model")


def score_npz(path: str | Path) -> dict:
    """{"prompt_following": score, "shuffled_prompts": shuffled_baseline} of an .npz holding
    arr_0 (uint8 NHWC) and prompts (unicode, one per image). Nothing is unpickled."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass npz= a samples .npz with arr_0 "
                                f"and prompts")
    require_npz(path, "save samples with np.savez(path, arr_0=uint8 NHWC images, "
                      "prompts=np.array(captions))")
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in ("arr_0", "prompts"):
                if key not in npz.files:
                    extra = NO_PROMPTS if key == "prompts" else "it holds no images"
                    raise ValueError(f"{path}: no '{key}' array (it has {npz.files}); {extra}")
            images, prompts = npz["arr_0"], npz["prompts"]
    except ValueError as e:
        if "pickle" not in str(e):
            raise
        raise ValueError(f"{path}: an array is stored as Python objects, which are not "
                         f"unpickled here; save prompts as np.array(captions) (a unicode "
                         f"array)") from None
    if prompts.dtype.kind != "U" or prompts.ndim != 1:
        raise ValueError(f"{path}: 'prompts' must be a 1-d unicode array (np.array(captions)), "
                         f"got {prompts.dtype} {prompts.shape}")
    try:
        return {"prompt_following": score(images, prompts),
                "shuffled_prompts": shuffled_baseline(images, prompts)}
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------ command

@dataclass
class PromptFollowConfig:
    npz: str = "???"  # samples .npz: arr_0 (uint8 NHWC) and prompts (a unicode array, one per image)
    out: str = ""  # write the result here as JSON ('' prints only)

    def validate(self) -> None:
        if self.out and Path(self.out).is_dir():
            raise ConfigError(f"out={self.out} is a folder; give a file name such as "
                              f"{Path(self.out) / 'prompt_follow.json'}")


def table(result: dict) -> str:
    """One line per attribute: samples, shuffled prompts, chance."""
    ours, base = result["prompt_following"], result["shuffled_prompts"]
    lines = [f"{'':<12} {'samples':>8} {'shuffled':>9} {'chance':>7}"]
    for key in (*ATTRIBUTES, "all_correct"):
        lines.append(f"{key:<12} {ours[key]:>8.3f} {base[key]:>9.3f} {ours['chance'][key]:>7.3f}")
    lines.append(f"{ours['count']} images, {ours['no_object']:.1%} with no object")
    return "\n".join(lines)


def run(cfg: PromptFollowConfig) -> dict:
    result = score_npz(cfg.npz)
    settings = Path(cfg.npz).parent / "settings.json"  # what sample.py drew them with
    if settings.is_file():
        made = json.loads(settings.read_text())
        result["sampled_with"] = {k: made[k] for k in ("sampling", "sampler", "seed", "weights_sha256")
                                  if k in made}
    print(table(result))
    if cfg.out:
        atomic_write_text(cfg.out, json.dumps(result, indent=2) + "\n")
        print(f"wrote {cfg.out}")
    return result


def main(argv: list[str] | None = None) -> dict:
    """The command: any error ends in one `error: ...` line (SystemExit)."""
    return run_cli(run, PromptFollowConfig, __doc__, argv)


if __name__ == "__main__":
    main()
