"""COCO-format data: dataset, augmentation, grouped sampling and a synthetic dataset. Loaded on first
use (PEP 562), so that the category tables (``data.categories``) import no torch."""
import importlib
from typing import Any

_EXPORTS = {"BoxWarning": "coco", "CocoDetection": "coco", "DatasetError": "coco", "collate": "coco",
            "read_annotations": "coco", "load_image": "images", "GroupedBatchSampler": "samplers",
            "make_shapes_dataset": "synthetic", "AUGMENTATIONS": "transforms", "Augment": "transforms",
            "Compose": "transforms"}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'hrnetdet.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


__all__ = list(_EXPORTS)
