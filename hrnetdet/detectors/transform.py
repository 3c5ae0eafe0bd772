"""Input and output transform with the reference's arithmetic.

The resized size is ``int(side * f + 0.5)`` with ``f = min(max_size / long, min_size / short)`` in
double precision (torchvision floors a float32 product, so 480 -> 799 instead of 800); the image is
resized like the reference's cv2 ``INTER_LINEAR`` on 8-bit pixels, bit for bit (an image that
requires grad is interpolated in float instead, so that gradients reach it), and normalised after
resizing; masks are pasted with the reference's ``grid_sample`` rule and thresholded at
``mask_thresh``. See docs/NUMERICS.md, 'Resize rounding', 'cv2-style resize', 'Differentiable
resize', 'Normalisation and padding' and 'Mask pasting'.

The transform also checks the input contract (a list of finite CHW RGB floats in [0, 1], at least
``MIN_IMAGE_SIDE`` pixels on each side), so that every family and its TorchScript form reject
out-of-contract images with a message naming the image, instead of detecting garbage.
"""
import math
import types
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from ..heads.masks import paste_masks
from ..heads.semantic import SEMANTIC_KEY

MIN_IMAGE_SIDE = 8
RANGE_TOLERANCE = 0.01  # resampled or colour-jittered [0, 1] images may overshoot a little
# HRFPN's coarsest level average-pools the stride-4 map by 16: a padded batch needs 64 pixels per side.
MIN_BATCH_SIDE = 64


def scriptable_alias(method: Callable, name: str) -> Callable:
    """A base class's ``method`` under another ``name``, so that an override can call it under
    TorchScript, which has no ``super()`` and compiles a called method under its function name."""
    alias = types.FunctionType(method.__code__, method.__globals__, name, method.__defaults__,
                               method.__closure__)
    alias.__annotations__ = method.__annotations__
    alias.__qualname__ = f"{method.__qualname__.rsplit('.', 1)[0]}.{name}"
    return alias


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
        # Attributes: TorchScript cannot read str or int globals.
        self.paste = True  # False: masks stay per box (export traces the model without pasting)
        self.semantic_key = SEMANTIC_KEY
        self.min_image_side = MIN_IMAGE_SIDE
        self.range_tolerance = RANGE_TOLERANCE
        self.min_batch_side = MIN_BATCH_SIDE
        # Empty, not saved: follows the model's .to(dtype)/.half(), so images are normalised into
        # the dtype of the weights they meet.
        self.register_buffer("dtype_like", torch.empty(0), persistent=False)

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Tuple[ImageList, Optional[List[Dict[str, Tensor]]]]:
        return self.resize_and_batch(self.check_images(images), targets)

    resize_and_batch = scriptable_alias(GeneralizedRCNNTransform.forward, "resize_and_batch")
    torchvision_batch_images = scriptable_alias(GeneralizedRCNNTransform.batch_images, "torchvision_batch_images")

    def check_images(self, images: List[Tensor]) -> List[Tensor]:
        """Images in float32 (the resize works on the 8-bit grid), or a ValueError naming the first
        image out of contract. One min/max reduction per image and one device sync per batch."""
        if len(images) == 0:
            raise ValueError("expected a list of CHW image tensors, got an empty list")
        checked: List[Tensor] = []
        ranges: List[Tensor] = []
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"image {i}: shape {list(image.shape)}; expected (3, H, W) RGB "
                                 f"(drop an alpha channel, repeat a grey one)")
            if not image.is_floating_point():
                raise ValueError(f"image {i}: dtype {image.dtype}; expected floats in [0, 1]: "
                                 f"divide uint8 images by 255")
            h, w = int(image.shape[1]), int(image.shape[2])
            if min(h, w) < self.min_image_side:
                raise ValueError(f"image {i}: {h}x{w} pixels; expected at least {self.min_image_side} "
                                 f"on each side")
            image = image.float()
            low, high = torch.aminmax(image)
            ranges.append(torch.stack([low, high]))
            checked.append(image)
        bounds: List[List[float]] = torch.stack(ranges).tolist()
        for i, (low, high) in enumerate(bounds):
            if math.isnan(low) or math.isnan(high):
                raise ValueError(f"image {i}: contains NaN; expected finite floats in [0, 1]")
            if high > 1 + self.range_tolerance:
                raise ValueError(f"image {i}: values up to {high}; expected floats in [0, 1]: "
                                 f"divide uint8 images by 255")
            if low < -self.range_tolerance:
                raise ValueError(f"image {i}: values down to {low}; expected floats in [0, 1] "
                                 f"(the model normalises them itself)")
        return checked

    def batch_images(self, images: List[Tensor], size_divisible: int = 32) -> Tensor:
        """torchvision's zero-padded batch, padded further to ``MIN_BATCH_SIDE`` for thin images."""
        batch = self.torchvision_batch_images(images, size_divisible)
        pad_h = max(0, self.min_batch_side - int(batch.shape[-2]))
        pad_w = max(0, self.min_batch_side - int(batch.shape[-1]))
        if pad_h > 0 or pad_w > 0:
            batch = F.pad(batch, [0, pad_w, 0, pad_h])
        return batch

    def normalize(self, image: Tensor) -> Tensor:
        """Deferred: the reference normalises after resizing (see ``resize``)."""
        return image

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None
               ) -> Tuple[Tensor, Optional[Dict[str, Tensor]]]:
        h, w = int(image.shape[-2]), int(image.shape[-1])
        size = float(self.torch_choice(self.min_size)) if self.training else float(self.min_size[-1])
        new_h, new_w = reference_size(h, w, size, float(self.max_size))
        if (new_h, new_w) != (h, w):
            image = self.resize_image(image, new_h, new_w)
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        image = ((image - mean[:, None, None]) / std[:, None, None]).to(self.dtype_like.dtype)
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

    def resize_image(self, image: Tensor, height: int, width: int) -> Tensor:
        """The reference's 8-bit resize, or, where the image requires grad (saliency, adversarial
        inputs), float bilinear interpolation with the same sampling grid, which lets gradients
        reach the input: docs/NUMERICS.md, 'Differentiable resize'."""
        if torch.is_grad_enabled() and image.requires_grad:
            return F.interpolate(image[None], size=[height, width], mode="bilinear", align_corners=False)[0]
        return cv2_linear_resize(image, height, width)

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
