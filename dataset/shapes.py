"""`shapes`: the built-in procedural dataset that the quickstart and the tests train on.

Eight shape classes, each varied in fill colour (8), size (3), position (a 3x3 grid of named
regions) and background (5), with a caption naming every attribute, e.g. "a small red triangle
at the top left on a grey background". Image i of a split is a pure function of
(seed, split, i, resolution, jitter); the attributes do not depend on the resolution, so the same
image at 32 and at 64 pixels differs only in sampling. Shapes are drawn from signed distance
functions evaluated at pixel centres, which anti-aliases them for free.

By default every attribute is discrete: one radius per size, the centre of each region on a
lattice of 1/8 of the image side, no rotation, the named colours exactly, flat backgrounds. Equal
content then gives equal tokenizer codes, which is what lets a 2-minute VQ and a 5-minute GPT on
a CPU learn the shapes (docs/next-token.md, "What to expect from the quickstart"). `jitter=true` adds continuous
variation inside each attribute (radius within the size's range, position within the region,
rotation up to 15 degrees, colour jitter, a background gradient): a harder dataset, with the same
discrete attributes and captions image for image.

    python -m dataset.shapes out=data/shapes32 resolution=32 num_train=8000 num_heldout=500

writes `out/train/<class>/<index>.png` + `out/train/captions.jsonl`, the same under
`out/heldout/` (each split is a ClassFolderDataset root), and `out/dataset.json`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from common.config import ConfigError, run_cli
from common.io import atomic_write_text
from dataset.images import save_png

# Alphabetical on purpose: ClassFolderDataset labels classes by their sorted folder names (the
# ImageNet convention), so this order makes `render(...).label` equal the label read back from
# the written folders.
CLASSES = ("circle", "crescent", "cross", "diamond", "ring", "square", "star", "triangle")
FILL_COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (240, 210, 40), "orange": (245, 140, 30), "purple": (140, 60, 190),
    "white": (245, 245, 245), "cyan": (40, 200, 210),
}
BACKGROUNDS = {
    "grey": (128, 128, 128), "black": (20, 20, 20), "white": (235, 235, 235),
    "navy": (25, 35, 90), "beige": (225, 210, 175),
}
# Shape radius as a fraction of the image side. "small" is >= 5 px at 32x32 so a 32-pixel star
# still has visible points.
SIZES = {"small": (0.16, 0.18), "medium": (0.21, 0.23), "large": (0.26, 0.28)}
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
SPLITS = {"train": 0, "heldout": 1}
MIN_RESOLUTION, MAX_RESOLUTION = 32, 256
MIN_COLOR_DISTANCE = 110.0  # RGB Euclidean; rejects e.g. white on beige, which is hard to see
MAX_ROTATION_DEG = 15.0  # small enough that a square never turns into a diamond
MARGIN = 0.03  # gap between a shape's bounding circle and the image border
LATTICE = 8  # without jitter, centres sit on multiples of 1/LATTICE of the side (a 4-px token grid at 32)
FORMAT_VERSION = 2  # bump when rendering changes, so old folders are not silently mixed in


def _star(points: int = 5, outer: float = 1.08, inner: float = 0.52) -> np.ndarray:
    a = np.deg2rad(-90.0 + np.arange(2 * points) * 180.0 / points)
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _triangle(circumradius: float = 1.1) -> np.ndarray:
    a = np.deg2rad([-90.0, 30.0, 150.0])  # apex up (image y grows downwards)
    return circumradius * np.stack([np.cos(a), np.sin(a)], axis=1)


def _cross(arm: float = 1.02, half: float = 0.34) -> np.ndarray:
    return np.array([(-half, -arm), (half, -arm), (half, -half), (arm, -half), (arm, half),
                     (half, half), (half, arm), (-half, arm), (-half, half), (-arm, half),
                     (-arm, -half), (-half, -half)])


# Outlines in units of the shape radius, sized so that every class looks about equally big.
POLYGONS = {
    "square": np.array([(-0.75, -0.75), (0.75, -0.75), (0.75, 0.75), (-0.75, 0.75)]),
    "triangle": _triangle(),
    "diamond": np.array([(0.0, -1.12), (0.72, 0.0), (0.0, 1.12), (-0.72, 0.0)]),
    "cross": _cross(),
    "star": _star(),
}
# Radius of the circle (in shape radii) that holds the shape at any rotation, for placement.
EXTENT = {name: 1.0 for name in CLASSES}
EXTENT.update({name: float(np.hypot(*poly.T).max()) for name, poly in POLYGONS.items()})


def _color_distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return math.dist(a, b)


# Fill colours that stand out on each background; drawing among these is the same as redrawing
# until the colour is far enough, without the loop.
ALLOWED_FILLS = {
    bg: [c for c, rgb in FILL_COLORS.items() if _color_distance(rgb, bg_rgb) >= MIN_COLOR_DISTANCE]
    for bg, bg_rgb in BACKGROUNDS.items()
}


@dataclass(frozen=True)
class ShapeAttributes:
    """Everything that defines one image except its pixels; independent of the resolution."""

    label: int
    class_name: str
    size: str  # small | medium | large
    radius: float  # shape radius as a fraction of the image side
    color: str  # fill colour name (a key of FILL_COLORS)
    background: str  # background colour name (a key of BACKGROUNDS)
    position: str  # one of POSITIONS
    center: tuple[float, float]  # (x, y) as fractions of the image side, y downwards
    rotation_deg: float
    fill_rgb: tuple[int, int, int]  # the named colour (with jitter: plus up to +-10 per channel)
    background_rgb: tuple[int, int, int]
    gradient: tuple[float, float]  # (angle in radians, amplitude in grey levels) of the background
    caption: str


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == is ambiguous
class ShapeSample(ShapeAttributes):
    image: np.ndarray = dataclasses.field(repr=False, default=None)  # uint8 (R, R, 3)


def caption_for(size: str, color: str, class_name: str, position: str, background: str) -> str:
    where = {"center": "in the center", "left": "on the left", "right": "on the right"}
    place = where.get(position, f"at the {position}")
    return f"a {size} {color} {class_name} {place} on a {background} background"


def check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) \
            or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"shapes resolution must be an integer from {MIN_RESOLUTION} to "
                         f"{MAX_RESOLUTION} pixels, got {resolution!r}")
    return int(resolution)


def _rng(index: int, split: str, seed: int) -> np.random.Generator:
    if split not in SPLITS:
        raise ValueError(f"unknown shapes split {split!r}; choose one of {sorted(SPLITS)}")
    if index < 0 or seed < 0:
        raise ValueError(f"shapes index and seed must be >= 0, got index={index} seed={seed}")
    # Separate streams per (seed, split, index): train and heldout never share an image, and
    # any image can be rendered alone without generating the ones before it.
    return np.random.default_rng([int(seed), SPLITS[split], int(index)])


def shape_attributes(index: int, split: str = "train", seed: int = 0,
                     jitter: bool = False) -> ShapeAttributes:
    """Draw the attributes of image `index` of `split` (cheap: no pixels).

    Everything is drawn in the same order with and without `jitter`, so image i has the same
    class, size, colour, background and position (and caption) either way.
    """
    rng = _rng(index, split, seed)
    class_name = CLASSES[index % len(CLASSES)]
    size = list(SIZES)[rng.integers(len(SIZES))]
    jittered_radius = float(rng.uniform(*SIZES[size]))
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    allowed = ALLOWED_FILLS[background]
    color = allowed[rng.integers(len(allowed))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    row, col = divmod(POSITIONS.index(position), 3)
    jx, jy = rng.uniform(0.1, 0.9, size=2)
    rotation = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
    gradient = (float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0, 20)))
    rgb_jitter = rng.integers(-10, 11, size=3)
    radius = jittered_radius if jitter else 0.5 * sum(SIZES[size])
    # Regions are thirds of the range where the whole shape fits, so a large shape at the top left
    # touches neither border; jitter stays inside the middle 80% of the third to keep regions apart.
    lo = EXTENT[class_name] * radius + MARGIN
    third = (1.0 - 2.0 * lo) / 3.0
    if jitter:
        center = (float(lo + (col + jx) * third), float(lo + (row + jy) * third))
        fill = tuple(int(v) for v in np.clip(np.add(FILL_COLORS[color], rgb_jitter), 0, 255))
    else:
        # the region's centre moved to the nearest lattice point (by at most 1/16 of the side;
        # every class and size still fits inside the image, tested)
        center = tuple(round((lo + (k + 0.5) * third) * LATTICE) / LATTICE for k in (col, row))
        rotation, gradient, fill = 0.0, (0.0, 0.0), FILL_COLORS[color]
    return ShapeAttributes(
        label=index % len(CLASSES), class_name=class_name, size=size, radius=radius, color=color,
        background=background, position=position, center=center, rotation_deg=rotation,
        fill_rgb=fill, background_rgb=BACKGROUNDS[background], gradient=gradient,
        caption=caption_for(size, color, class_name, position, background))


@functools.lru_cache(maxsize=8)
def _pixel_centres(resolution: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(resolution) + 0.5) / resolution
    x, y = np.meshgrid(c, c)  # (R, R) each, x along columns
    return x, y


def _polygon_sdf(x: np.ndarray, y: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Exact signed distance to a closed polygon (negative inside), any simple polygon."""
    dist2 = np.full(x.shape, np.inf)
    inside = np.zeros(x.shape, dtype=bool)
    for (ax, ay), (bx, by) in zip(verts, np.roll(verts, -1, axis=0)):
        ex, ey = bx - ax, by - ay
        wx, wy = x - ax, y - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        dist2 = np.minimum(dist2, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        if ey != 0.0:  # even-odd rule: count edges crossed by a ray towards +x
            inside ^= ((ay > y) != (by > y)) & (x < ax + ex * (y - ay) / ey)
    d = np.sqrt(dist2)
    return np.where(inside, -d, d)


def shape_sdf(class_name: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (image-side units) to shape `class_name` of radius r centred at (0, 0)."""
    if class_name in POLYGONS:
        return _polygon_sdf(u, v, POLYGONS[class_name] * r)
    d = np.hypot(u, v)
    if class_name == "circle":
        return d - r
    if class_name == "ring":
        return np.abs(d - 0.7 * r) - 0.3 * r  # annulus from 0.4 r to r
    if class_name == "crescent":
        bite = np.hypot(u - 0.42 * r, v) - 0.8 * r  # a disc bitten out on the right
        return np.maximum(d - r, -bite)
    raise ValueError(f"unknown shape class {class_name!r}; choose one of {CLASSES}")


def draw(attrs: ShapeAttributes, resolution: int) -> np.ndarray:
    """Rasterise `attrs` at `resolution`: uint8 (R, R, 3)."""
    x, y = _pixel_centres(check_resolution(resolution))
    angle, amplitude = attrs.gradient
    ramp = (x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle)  # in [-0.71, 0.71]
    background = np.add(attrs.background_rgb, (amplitude * ramp)[..., None])  # (R, R, 3)
    theta = math.radians(attrs.rotation_deg)
    dx, dy = x - attrs.center[0], y - attrs.center[1]
    u = math.cos(theta) * dx + math.sin(theta) * dy  # rotate the sample points, not the shape
    v = -math.sin(theta) * dx + math.cos(theta) * dy
    sdf_px = shape_sdf(attrs.class_name, u, v, attrs.radius) * resolution
    # Area coverage of a pixel by an edge half a pixel away falls linearly to 0: cheap AA.
    coverage = np.clip(0.5 - sdf_px, 0.0, 1.0)[..., None]  # (R, R, 1)
    image = background + (np.asarray(attrs.fill_rgb, dtype=np.float64) - background) * coverage
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(index: int, split: str = "train", resolution: int = 32, seed: int = 0,
           jitter: bool = False) -> ShapeSample:
    """Image `index` of `split`: pixels plus the attributes and caption that describe them."""
    check_resolution(resolution)
    attrs = shape_attributes(index, split, seed, jitter)
    return ShapeSample(**{f.name: getattr(attrs, f.name) for f in dataclasses.fields(attrs)},
                       image=draw(attrs, resolution))


# ---------------------------------------------------------------------------------------------
# Writing the dataset to disk


@dataclass
class ShapesConfig:
    out: str = "data/shapes32"  # output folder; gets train/ and heldout/ (class folders), dataset.json
    resolution: int = 32  # image side in pixels, 32 to 256
    num_train: int = 8000  # images in the train split (at least 8, one per class)
    num_heldout: int = 500  # images in the heldout split (0, or at least 8)
    seed: int = 0  # generator seed; image i of a split depends only on (seed, split, i, resolution, jitter)
    jitter: bool = False  # continuous variation inside each attribute (harder; module docstring)
    progress: bool = True  # show a progress bar

    def validate(self) -> None:
        try:
            check_resolution(self.resolution)
        except ValueError as e:
            raise ConfigError(f"resolution: {e}") from None
        if self.num_train < len(CLASSES):
            raise ConfigError(f"num_train={self.num_train}: need at least {len(CLASSES)} so "
                              f"every class has a folder")
        if self.num_heldout != 0 and self.num_heldout < len(CLASSES):
            raise ConfigError(f"num_heldout={self.num_heldout}: use 0 or at least {len(CLASSES)}")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed}: must be >= 0")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise ConfigError(f"out={self.out} is a file; choose a folder for the dataset")


def _settings(cfg: ShapesConfig) -> dict:
    return {"generator": "argen.dataset.shapes", "format_version": FORMAT_VERSION,
            "seed": cfg.seed, "jitter": cfg.jitter, "resolution": cfg.resolution,
            "num_train": cfg.num_train,
            "num_heldout": cfg.num_heldout, "classes": list(CLASSES),
            "splits": {"train": "train", "heldout": "heldout"}}


def _check_out_folder(out: Path, settings: dict) -> None:
    """Refuse to mix images of different settings in one folder (counts may change)."""
    meta = out / "dataset.json"
    if out.exists() and not out.is_dir():
        raise ValueError(f"out={out} is a file; choose another out=")
    if not meta.is_file():
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"{out} exists, is not empty and holds no dataset.json, so it is not "
                             f"a shapes dataset; choose another out=")
        return
    try:
        old = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta} is unreadable ({e}); delete {out} or choose another "
                         f"out=") from None
    identity = ("generator", "format_version", "seed", "jitter", "resolution", "classes")
    diff = [f"{k}: {old.get(k)!r} there vs {settings[k]!r} now" for k in identity
            if old.get(k) != settings[k]]
    if diff:
        raise ValueError(f"{out} already holds a shapes dataset made with other settings "
                         f"({'; '.join(diff)}); choose another out= or delete {out}")


_GENERATED = re.compile(r"^(\d{6,})\.png$")


def _remove_surplus(split_dir: Path, count: int) -> int:
    """Delete images from an earlier, larger run so the folder matches its captions file."""
    removed = 0
    for name in CLASSES:
        class_dir = split_dir / name
        if not class_dir.is_dir():
            continue
        for f in class_dir.iterdir():
            m = _GENERATED.match(f.name)
            if m and int(m.group(1)) >= count:
                f.unlink()
                removed += 1
    return removed


def write_split(out: Path, split: str, count: int, cfg: ShapesConfig) -> tuple[int, int]:
    """Write `count` images of `split` under out/split; returns (written, skipped)."""
    split_dir = out / split
    written = skipped = 0
    lines = []
    for i in tqdm(range(count), desc=f"shapes {split}", unit="img", disable=not cfg.progress,
                  dynamic_ncols=True):
        attrs = shape_attributes(i, split, cfg.seed, cfg.jitter)
        rel = f"{attrs.class_name}/{i:06d}.png"
        path = split_dir / rel
        if path.is_file():  # writes are atomic, so an existing file is a complete one
            skipped += 1
        else:
            save_png(draw(attrs, cfg.resolution), path)
            written += 1
        lines.append(json.dumps({"file": rel, "label": attrs.label, "class": attrs.class_name,
                                 "caption": attrs.caption}))
    _remove_surplus(split_dir, count)
    # Written last: a split with a captions file is a complete split.
    atomic_write_text(split_dir / "captions.jsonl", "\n".join(lines) + "\n")
    return written, skipped


def generate(cfg: ShapesConfig) -> dict:
    """Write (or complete) the dataset described by `cfg`; returns a summary dict."""
    out = Path(cfg.out)
    settings = _settings(cfg)
    _check_out_folder(out, settings)
    atomic_write_text(out / "dataset.json", json.dumps(settings, indent=2) + "\n")
    start = time.perf_counter()
    written = skipped = 0
    for split, count in (("train", cfg.num_train), ("heldout", cfg.num_heldout)):
        if count == 0:
            continue
        w, s = write_split(out, split, count, cfg)
        written, skipped = written + w, skipped + s
    return {"out": str(out), "written": written, "skipped": skipped,
            "seconds": time.perf_counter() - start, **settings}


def run(cfg: ShapesConfig) -> dict:
    """Write the dataset and print what was done; returns the summary."""
    summary = generate(cfg)
    print(f"shapes: {cfg.num_train} train + {cfg.num_heldout} heldout images at "
          f"{cfg.resolution}x{cfg.resolution} in {summary['out']} ({summary['written']} written, "
          f"{summary['skipped']} already there, {summary['seconds']:.1f}s)")
    return summary


def main(argv: list[str] | None = None) -> dict:
    """The command: any error ends in one `error: ...` line (SystemExit), as on the command line."""
    return run_cli(run, ShapesConfig, __doc__, argv)


if __name__ == "__main__":
    main()
