"""Training augmentation in the data pipeline. Resizing (including the reference's multi-scale
choice) and normalisation live in the model's ReferenceTransform, as in torchvision.

Random decisions come from a generator seeded by (seed, epoch, sample index), so an epoch's
augmentation does not depend on worker processes or on where a resumed run restarts.
"""
from typing import Callable, List, Tuple

import torch
from torch import Tensor

from .coco import Target


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2 ** 63))


class RandomHorizontalFlip:
    """Flip the image, its boxes and masks with probability ``p`` (the reference: 0.5)."""

    def __init__(self, p: float = 0.5, seed: int = 0):
        self.p = p
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __call__(self, image: Tensor, target: Target, index: int) -> Tuple[Tensor, Target]:
        if torch.rand(1, generator=sample_generator(self.seed, self.epoch, index)).item() >= self.p:
            return image, target
        width = image.shape[-1]
        image = image.flip(-1)
        target = dict(target)
        boxes = target["boxes"].clone()
        boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
        target["boxes"] = boxes
        if "masks" in target:
            target["masks"] = target["masks"].flip(-1)
        return image, target


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
