"""Prompt following on `shapes`, offline: does a sample show what its caption asks for?

GenEval judges a text-to-image model with an object detector; on the procedural `shapes` data
the attributes are simple enough to read back from the pixels (evaluation/shape_judge.py), so
this score needs no network, no download and no GPU. Captions parse back to the attributes they
name; `score` compares them with what the judge sees and carries each attribute's chance level,
and `shuffled_baseline` scores the images against other images' prompts: what a model that
ignores its prompt gets.

    python -m evaluation.prompt_follow npz=runs/x/samples/samples.npz out=prompt_follow.json

The .npz holds arr_0 (uint8 NHWC) and prompts (a unicode array, one caption per image).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np

from common.config import ConfigError, run_cli
from common.io import atomic_write_text
from dataset.shapes import POSITIONS, caption_for
from evaluation.inputs import require_npz
from evaluation.shape_judge import ATTRIBUTES, NONE, VALUES, judge

EXPECTED_FORM = ("'a SIZE COLOR SHAPE PLACE on a BACKGROUND background', e.g. "
                 f"{caption_for('small', 'red', 'triangle', 'top left', 'grey')!r} or "
                 f"{caption_for('large', 'blue', 'ring', 'center', 'black')!r}")


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
