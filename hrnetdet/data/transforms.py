"""Training augmentation presets on torchvision.transforms.v2, applied to the image, its boxes, masks
and semantic map together. Resizing to the model's input size (including the reference's
multi-scale choice) and normalisation live in the model's ReferenceTransform, as in torchvision.

Random decisions come from torch's generator seeded by (seed, epoch, sample index) inside a forked
RNG, so an epoch's augmentation does not depend on worker processes or on where a resumed run
restarts, and augmenting never moves the training RNG streams.
"""
from typing import Callable, List, Tuple

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..heads.semantic import SEMANTIC_KEY
from .coco import Target

AUGMENTATIONS = ("none", "flip", "photometric", "scale-jitter")


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2 ** 63)


def _ops(preset: str, height: int, width: int) -> Callable:
    """The v2 pipeline of a preset for an image of this size."""
    flip = v2.RandomHorizontalFlip(0.5)  # the reference's
    if preset == "flip":
        return flip
    if preset == "photometric":
        return v2.Compose([v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02), flip])
    # Large-scale-jitter style: resize by a random factor of the image's own size, then crop or
    # pad back to that size (the model's transform resizes afterwards, as for every preset).
    return v2.Compose([flip, v2.ScaleJitter((height, width), scale_range=(0.5, 2.0)),
                       v2.RandomCrop((height, width), pad_if_needed=True)])


class Augment:
    """One of ``AUGMENTATIONS``: "none", "flip" (horizontal, p=0.5), "photometric" (colour jitter
    and flip) or "scale-jitter" (flip, random resize by 0.5-2x and crop/pad to the image size).
    Boxes smaller than a pixel after cropping are dropped with their labels and masks."""

    def __init__(self, preset: str = "flip", seed: int = 0):
        if preset not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {preset!r}; choose one of {', '.join(AUGMENTATIONS)}")
        self.preset = preset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image: Tensor, target: Target, index: int) -> Tuple[Tensor, Target]:
        if self.preset == "none":
            return image, target
        height, width = image.shape[-2:]
        spatial = {"boxes": tv_tensors.BoundingBoxes(target["boxes"], format="XYXY", canvas_size=(height, width))}
        for key in ("masks", SEMANTIC_KEY):
            if key in target:
                spatial[key] = tv_tensors.Mask(target[key])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, self.epoch, index))
            image, spatial = _ops(self.preset, height, width)(tv_tensors.Image(image), spatial)
        out = dict(target)
        boxes = spatial["boxes"].as_subclass(Tensor)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        out["boxes"] = boxes[keep]
        for key in ("labels", "masks"):
            if key in out:
                out[key] = (spatial[key].as_subclass(Tensor) if key in spatial else out[key])[keep]
        if SEMANTIC_KEY in spatial:
            out[SEMANTIC_KEY] = spatial[SEMANTIC_KEY].as_subclass(Tensor)
        return image.as_subclass(Tensor), out


class Compose:
    def __init__(self, transforms: List[Callable]):
        self.transforms = transforms

    def set_epoch(self, epoch: int) -> None:
        for t in self.transforms:
            if hasattr(t, "set_epoch"):
                t.set_epoch(epoch)

    def __call__(self, image: Tensor, target: Target, index: int) -> Tuple[Tensor, Target]:
        for t in self.transforms:
            image, target = t(image, target, index)
        return image, target
