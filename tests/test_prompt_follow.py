"""The offline prompt-following judge of `shapes`: captions parse back exactly, ground truth
scores near 100%, other images' prompts score near chance, and .npz files round-trip."""

from __future__ import annotations

import json
from itertools import product

import numpy as np
import pytest

from dataset.shapes import BACKGROUNDS, CLASSES, FILL_COLORS, POSITIONS, SIZES, caption_for, render
from evaluation.prompt_follow import main, parse_caption, score, score_npz, shuffled_baseline
from evaluation.shape_judge import ATTRIBUTES, NONE, VALUES, judge

COUNT = 200  # images per setting: a miss costs 0.5%, so the thresholds below allow a few


@pytest.fixture(scope="module", params=[(32, False), (64, False), (64, True)],
                ids=["32px", "64px", "64px-jitter"])
def ground_truth(request):
    resolution, jitter = request.param
    samples = [render(i, "heldout", resolution, jitter=jitter) for i in range(COUNT)]
    return np.stack([s.image for s in samples]), [s.caption for s in samples]


def test_parse_caption_inverts_caption_for():
    for size, color, shape, position, background in product(SIZES, FILL_COLORS, CLASSES,
                                                             POSITIONS, BACKGROUNDS):
        caption = caption_for(size, color, shape, position, background)
        assert parse_caption(caption) == {"shape": shape, "color": color, "size": size,
                                          "position": position, "background": background}
    assert parse_caption("a small red circle in the center on a grey background")["position"] \
        == "center"
    assert parse_caption("a small red circle on the left on a grey background")["position"] \
        == "left"


@pytest.mark.parametrize("caption", ["a red circle on a grey background",
                                     "a small pink circle in the center on a grey background",
                                     "a small red circle at the center on a grey background", ""])
def test_parse_caption_rejects_a_malformed_caption_naming_it(caption):
    with pytest.raises(ValueError, match="cannot parse") as err:
        parse_caption(caption)
    assert repr(caption) in str(err.value)
    assert "a small red triangle at the top left on a grey background" in str(err.value)
    assert "'in the center', 'on the right', 'at the bottom left'" in str(err.value)


def test_ground_truth_with_its_own_captions_scores_near_100(ground_truth):
    images, captions = ground_truth
    result = score(images, captions)
    # measured: 1.000 on every attribute at 32, 48, 64, 100, 128 and 256 px, with and without
    # jitter (thousands of images)
    assert {a: result[a] for a in ATTRIBUTES} == pytest.approx(
        {a: 1.0 for a in ATTRIBUTES}, abs=0.01)
    assert result["all_correct"] >= 0.98
    assert result["count"] == COUNT and result["no_object"] == 0.0


def test_shuffled_prompts_score_near_chance(ground_truth):
    images, captions = ground_truth
    result = shuffled_baseline(images, captions, seed=0)
    chance = result["chance"]
    # measured (these 200 images, seed 0): shape 0.115, color 0.125, size 0.325, position 0.13,
    # background 0.195, all_correct 0.0; each about its chance level
    for a in ATTRIBUTES:
        assert result[a] < chance[a] + 0.15, a
    assert result["all_correct"] < 0.05
    assert chance["shape"] == 1 / len(CLASSES) and chance["position"] == 1 / 9
    assert chance["all_correct"] == pytest.approx(np.prod([chance[a] for a in ATTRIBUTES]))


def test_shuffled_baseline_gives_every_image_another_prompt():
    samples = [render(i, "heldout", 32) for i in range(2)]  # differ in every attribute
    images, captions = np.stack([s.image for s in samples]), [s.caption for s in samples]
    assert score(images, captions)["all_correct"] == 1.0
    assert shuffled_baseline(images, captions, seed=5)["all_correct"] == 0.0


def test_an_image_with_no_foreground_is_wrong_but_keeps_its_background():
    sample = render(3, "heldout", 32)
    blank = np.broadcast_to(np.uint8(BACKGROUNDS[sample.background]), (1, 32, 32, 3))
    result = score(blank, [sample.caption])
    assert result["no_object"] == 1.0 and result["background"] == 1.0
    assert result["all_correct"] == 0.0
    assert judge(blank[0])["shape"] == NONE


def test_imperfect_images_get_a_verdict_without_crashing():
    rng = np.random.default_rng(0)
    two_blobs = render(0, "train", 48).image.copy()
    two_blobs[36:44, 36:44] = 250  # a smaller white blob away from the shape: ignored
    dot = np.zeros((40, 40, 3), np.uint8)
    dot[9, 9] = 255
    odd = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), dot, two_blobs,
           np.full((256, 256, 3), 255, np.uint8), np.repeat(np.linspace(0, 255, 64,
           dtype=np.uint8)[None, :, None], 64, 0).repeat(3, 2)]
    for image in odd:
        verdict = judge(image)
        assert all(verdict[a] in (*VALUES[a], NONE) for a in ATTRIBUTES), verdict
    assert judge(dot)["shape"] == NONE
    assert judge(two_blobs) == parse_caption(render(0, "train").caption)


def test_score_names_the_bad_prompt_and_a_count_mismatch():
    images = np.stack([render(i, resolution=32).image for i in range(2)])
    with pytest.raises(ValueError, match="prompt 1: cannot parse the caption 'a dog'"):
        score(images, [render(0).caption, "a dog"])
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        score(images, [render(0).caption])


def test_score_npz_round_trip_and_cli(tmp_path, capsys):
    samples = [render(i, "heldout", 32, jitter=True) for i in range(24)]
    images, captions = np.stack([s.image for s in samples]), [s.caption for s in samples]
    path = tmp_path / "samples.npz"
    np.savez(path, arr_0=images, prompts=np.array(captions))
    result = score_npz(path)
    assert result["prompt_following"] == score(images, captions)
    assert result["shuffled_prompts"] == shuffled_baseline(images, captions)
    out = tmp_path / "pf.json"
    assert main([f"npz={path}", f"out={out}"]) == result
    assert json.loads(out.read_text()) == result
    printed = capsys.readouterr().out
    assert all(line.split()[0] in (*ATTRIBUTES, "all_correct")
               for line in printed.splitlines()[1:7])


def test_score_npz_without_prompts_says_it_needs_a_text_model(tmp_path):
    path = tmp_path / "class_samples.npz"
    np.savez(path, arr_0=np.zeros((2, 32, 32, 3), np.uint8), arr_1=np.array([0, 1]))
    with pytest.raises(ValueError, match="has no prompts: it was sampled from a class-cond") as e:
        score_npz(path)
    assert str(path) in str(e.value) and "'prompts'" in str(e.value)
    with pytest.raises(SystemExit, match="error: .*no prompts"):
        main([f"npz={path}"])


def test_score_npz_does_not_unpickle_object_prompts(tmp_path):
    path = tmp_path / "object_prompts.npz"
    np.savez(path, arr_0=np.zeros((1, 32, 32, 3), np.uint8),
             prompts=np.array([render(0).caption], dtype=object))
    with pytest.raises(ValueError, match="not unpickled"):
        score_npz(path)
