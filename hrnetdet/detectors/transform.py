"""Input and output transform with the reference's arithmetic (spec §3.1, §5.1).

The resized size is ``int(side * f + 0.5)`` with ``f = min(max_size / long, min_size / short)`` in
double precision (torchvision floors a float32 product, so 480 -> 799 instead of 800); the image is
resized like the reference's cv2 ``INTER_LINEAR`` on 8-bit pixels, bit for bit, and normalised after
resizing (spec §5.1b); masks are pasted with the reference's ``grid_sample`` rule and thresholded at
``mask_thresh``.
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


def _cv2_linear_taps(src: int, dst: int, clamp_fraction: bool, device: torch.device
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """cv2 INTER_LINEAR's two source indices and 11-bit fixed-point weights per output index. cv2
    computes the fraction in float32; at the border it zeroes the fraction along x but only clamps
    the row index along y."""
    scale = 1.0 / (dst / src)
    f = ((torch.arange(dst, dtype=torch.float64, device=device) + 0.5) * scale - 0.5).float()
    i = torch.floor(f)
    f = f - i
    i = i.long()
    if clamp_fraction:
        f = torch.where((i < 0) | (i >= src - 1), torch.zeros_like(f), f)
    w1 = torch.round(f * 2048).int()
    w0 = torch.round((1 - f) * 2048).int()
    return i.clamp(0, src - 1), (i + 1).clamp(0, src - 1), w0, w1


def cv2_linear_resize(image: Tensor, height: int, width: int) -> Tensor:
    """``cv2.resize(INTER_LINEAR)`` of the 8-bit version of a [0, 1] CHW image, bit-exact with
    OpenCV's vectorised uint8 path (which the reference runs on the uint8 image before normalising);
    returns [0, 1] values on the 8-bit grid."""
    levels = (image * 255).round().clamp(0, 255).int()
    x0, x1, a0, a1 = _cv2_linear_taps(image.shape[-1], width, True, image.device)
    y0, y1, b0, b1 = _cv2_linear_taps(image.shape[-2], height, False, image.device)
    rows = levels[:, :, x0] * a0 + levels[:, :, x1] * a1          # 11 fractional bits
    top = ((rows[:, y0] >> 4) * b0[:, None]) >> 16
    bottom = ((rows[:, y1] >> 4) * b1[:, None]) >> 16
    return ((top + bottom + 2) >> 2).clamp(0, 255).to(image.dtype) / 255


class ReferenceTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform with the reference's resize rounding and mask pasting.

    ``min_size`` may be a tuple: in training one value is drawn per image (the reference's
    multi-scale "value" mode); evaluation uses the last. ``mask_thresh=None`` returns soft masks;
    ``paste = False`` leaves them as the heads' (N, 1, M, M) probabilities in each box's frame
    (for export graphs, where tracing would freeze the per-box paste windows).
    """

    def __init__(self, min_size, max_size: int, image_mean: List[float], image_std: List[float],
                 size_divisible: int = 32, mask_thresh: Optional[float] = 0.5):
        super().__init__(min_size, max_size, image_mean, image_std, size_divisible=size_divisible)
        self.mask_thresh = mask_thresh
        self.paste = True
        self.semantic_key = SEMANTIC_KEY  # an attribute: TorchScript cannot read str globals

    def normalize(self, image: Tensor) -> Tensor:
        """Deferred: the reference normalises after resizing (see ``resize``)."""
        return image

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None
               ) -> Tuple[Tensor, Optional[Dict[str, Tensor]]]:
        if not image.is_floating_point():
            raise TypeError(f"expected a float image in [0, 1], got dtype {image.dtype}")
        h, w = int(image.shape[-2]), int(image.shape[-1])
        if self.training and self._skip_resize:
            new_h, new_w = h, w
        else:
            size = float(self.torch_choice(self.min_size)) if self.training else float(self.min_size[-1])
            new_h, new_w = reference_size(h, w, size, float(self.max_size))
        if (new_h, new_w) != (h, w):
            image = cv2_linear_resize(image, new_h, new_w)
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        image = (image - mean[:, None, None]) / std[:, None, None]
        if target is None:
            return image, target
        target["boxes"] = resize_boxes(target["boxes"], [h, w], [new_h, new_w])
        if "masks" in target and (new_h, new_w) != (h, w):
            masks = target["masks"]
            target["masks"] = F.interpolate(masks[:, None].float(), size=[new_h, new_w])[:, 0].to(masks.dtype)
        if self.semantic_key in target and (new_h, new_w) != (h, w):  # nearest, as the reference
            seg = target[self.semantic_key]
            target[self.semantic_key] = F.interpolate(seg[None, None].float(), size=[new_h, new_w])[0, 0].to(seg.dtype)
        return image, target

    def postprocess(self, result: List[Dict[str, Tensor]], image_shapes: List[Tuple[int, int]],
                    original_image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            boxes = resize_boxes(pred["boxes"], list(im_s), list(o_im_s))
            pred["boxes"] = boxes
            if "masks" in pred and self.paste:
                pred["masks"] = paste_masks(pred["masks"], boxes, int(o_im_s[0]), int(o_im_s[1]),
                                            self.mask_thresh)
        return result
