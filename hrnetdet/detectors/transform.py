"""Input and output transform with the reference's arithmetic (spec §3.1, §5.1).

The resized size is ``int(side * f + 0.5)`` with ``f = min(max_size / long, min_size / short)`` in
double precision (torchvision floors a float32 product, so 480 -> 799 instead of 800); masks are
pasted with the reference's ``grid_sample`` rule and thresholded at ``mask_thresh``.
"""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from ..heads.masks import paste_masks
from ..heads.semantic import SEMANTIC_KEY


def reference_size(height: int, width: int, min_size: float, max_size: float) -> Tuple[int, int]:
    """The reference's keep-ratio resize target (mmcv ``rescale_size``), as (height, width)."""
    f = min(max_size / max(height, width), min_size / min(height, width))
    return int(height * f + 0.5), int(width * f + 0.5)


class ReferenceTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform with the reference's resize rounding and mask pasting.

    ``min_size`` may be a tuple: in training one value is drawn per image (the reference's
    multi-scale "value" mode); evaluation uses the last. ``mask_thresh=None`` returns soft masks.
    """

    def __init__(self, min_size, max_size: int, image_mean: List[float], image_std: List[float],
                 size_divisible: int = 32, mask_thresh: Optional[float] = 0.5):
        super().__init__(min_size, max_size, image_mean, image_std, size_divisible=size_divisible)
        self.mask_thresh = mask_thresh

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None
               ) -> Tuple[Tensor, Optional[Dict[str, Tensor]]]:
        h, w = int(image.shape[-2]), int(image.shape[-1])
        if self.training:
            if self._skip_resize:
                return image, target
            size = float(self.torch_choice(self.min_size))
        else:
            size = float(self.min_size[-1])
        new_h, new_w = reference_size(h, w, size, float(self.max_size))
        if (new_h, new_w) != (h, w):
            image = F.interpolate(image[None], size=[new_h, new_w], mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, target
        target["boxes"] = resize_boxes(target["boxes"], [h, w], [new_h, new_w])
        if "masks" in target and (new_h, new_w) != (h, w):
            masks = target["masks"]
            target["masks"] = F.interpolate(masks[:, None].float(), size=[new_h, new_w])[:, 0].to(masks.dtype)
        if SEMANTIC_KEY in target and (new_h, new_w) != (h, w):  # nearest, as the reference
            seg = target[SEMANTIC_KEY]
            target[SEMANTIC_KEY] = F.interpolate(seg[None, None].float(), size=[new_h, new_w])[0, 0].to(seg.dtype)
        return image, target

    def postprocess(self, result: List[Dict[str, Tensor]], image_shapes: List[Tuple[int, int]],
                    original_image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            boxes = resize_boxes(pred["boxes"], list(im_s), list(o_im_s))
            pred["boxes"] = boxes
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], boxes, int(o_im_s[0]), int(o_im_s[1]),
                                            self.mask_thresh)
        return result
