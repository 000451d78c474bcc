"""The class check of `shapes` runs: how often a sample's nearest training image, in pixels, is
of the sample's class. The shapes are discrete, so a clean sample is close to some training
image; this measures what a grid shows (do the rows draw their class?) over many samples."""

from __future__ import annotations

import numpy as np

from dataset.folder import ClassFolderDataset
from dataset.images import load_image
from evaluation.metrics import nearest_label_agreement


def class_agreement(images: np.ndarray, labels, train_root: str, resolution: int) -> dict:
    """images uint8 (N, H, W, 3) with their labels against the class folders at `train_root`:
    {"agreement", "per_class" (by class name), "median_distance"}."""
    train = ClassFolderDataset(train_root, resolution)
    ref = np.stack([load_image(path, resolution) for path, _ in train.samples])
    out = nearest_label_agreement(images, labels, ref, [y for _, y in train.samples])
    out["per_class"] = {train.classes[k]: v for k, v in out.pop("per_label").items()}
    return out
