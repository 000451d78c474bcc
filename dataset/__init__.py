"""Image datasets. `dataset.shapes` is not re-exported here so that `python -m dataset.shapes`
runs without importing itself twice."""

from dataset.folder import ClassFolderDataset
from dataset.images import (IMAGE_EXTENSIONS, ImageReadError, adm_center_crop, load_image,
                            save_png, to_tensor, to_uint8)

__all__ = ["ClassFolderDataset", "IMAGE_EXTENSIONS", "ImageReadError", "adm_center_crop",
           "load_image", "save_png", "to_tensor", "to_uint8"]
