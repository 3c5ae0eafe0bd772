"""The training-target contract every family checks in its training forward, in one place: a bad
target fails with a ValueError naming the image index and the field, instead of training silently
on a wrong label, mask or box (or failing deep inside a head)."""
from typing import Dict, List, Optional

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image


def check_targets(images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]], num_classes: int) -> None:
    """Labels in 1..num_classes-1 (0 is the background), boxes finite with x2 > x1 and y2 > y1 once
    clipped to the image, masks of the image's size; ``num_classes`` counts the background."""
    if targets is None:
        raise ValueError("in training mode, targets must be given")
    if len(targets) != len(images):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    for i, (image, t) in enumerate(zip(images, targets)):
        for key in ("boxes", "labels"):
            if key not in t:
                raise ValueError(f"targets[{i}] has no {key!r} field (fields: {sorted(t)})")
        boxes, labels = t["boxes"], t["labels"]
        if boxes.dim() != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"targets[{i}]['boxes'] must have shape [N, 4], got {list(boxes.shape)}")
        if labels.shape != (len(boxes),) or labels.is_floating_point():
            raise ValueError(f"targets[{i}]['labels'] must be {len(boxes)} integers (one per box), got "
                             f"{labels.dtype} of shape {list(labels.shape)}")
        bad = torch.nonzero((labels < 1) | (labels >= num_classes)).flatten()
        if len(bad):
            raise ValueError(f"targets[{i}]['labels'][{int(bad[0])}] is {int(labels[bad[0]])}: labels must be in "
                             f"1..{num_classes - 1} (0 is the background)")
        height, width = int(image.shape[-2]), int(image.shape[-1])
        finite = torch.isfinite(boxes).all(dim=1)
        clipped = clip_boxes_to_image(boxes, (height, width))
        empty = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
        bad = torch.nonzero(~finite | empty).flatten()
        if len(bad):
            j = int(bad[0])
            raise ValueError(f"targets[{i}]['boxes'][{j}] is {boxes[j].tolist()}: boxes must be finite xyxy with "
                             f"x2 > x1 and y2 > y1 once clipped to the {width}x{height} image")
        if "masks" in t and tuple(t["masks"].shape) != (len(boxes), height, width):
            raise ValueError(f"targets[{i}]['masks'] must have shape {[len(boxes), height, width]} (one mask of "
                             f"the image's size per box), got {list(t['masks'].shape)}")
