"""COCO-format data: dataset, augmentation, grouped sampling and a synthetic dataset."""
from .coco import BoxWarning, CocoDetection, DatasetError, collate, read_annotations
from .images import load_image
from .samplers import GroupedBatchSampler
from .synthetic import make_shapes_dataset
from .transforms import AUGMENTATIONS, Augment, Compose

__all__ = ["BoxWarning", "CocoDetection", "DatasetError", "collate", "load_image", "read_annotations",
           "GroupedBatchSampler", "make_shapes_dataset", "AUGMENTATIONS", "Augment", "Compose"]
