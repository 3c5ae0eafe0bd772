"""Mask targets and pasting as the reference computes them (see docs/NUMERICS.md,
'Mask targets' and 'Mask pasting')."""
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

from .precision import float32_if_half


def mask_targets(gt_masks: List[Tensor], proposals: List[Tensor], matched_idxs: List[Tensor],
                 size: int) -> Tensor:
    """Crop each positive proposal's ground-truth mask with aligned RoIAlign and binarise at 0.5."""
    out = []
    for masks, boxes, idx in zip(gt_masks, proposals, matched_idxs):
        if boxes.shape[0] == 0:
            continue
        rois = torch.cat([idx[:, None].to(boxes.dtype), boxes], dim=1)
        crops = roi_align(masks[:, None].to(boxes.dtype), rois, (size, size), spatial_scale=1.0,
                          sampling_ratio=0, aligned=True)
        out.append((crops[:, 0] >= 0.5).to(boxes.dtype))
    if not out:
        return torch.zeros((0, size, size), device=proposals[0].device)
    return torch.cat(out, dim=0)


def mask_loss(mask_logits: Tensor, labels: List[Tensor], targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of each positive RoI's own-class mask."""
    if targets.numel() == 0:
        return mask_logits.sum() * 0
    lab = torch.cat(labels)
    logits = mask_logits[torch.arange(lab.shape[0], device=lab.device), lab]
    return F.binary_cross_entropy_with_logits(logits, targets)


def paste_windows(boxes: Tensor, height: int, width: int) -> List[List[int]]:
    """Each box's pixels +-1, clamped to a ``height`` x ``width`` image, as [x0, y0, x1, y1]
    (end exclusive): the region its pasted mask can touch. Read to the host at once (one device
    synchronisation, not 4 per box)."""
    boxes = float32_if_half(boxes)
    windows: List[List[int]] = torch.stack([torch.clamp(torch.floor(boxes[:, 0]) - 1, min=0),
                        torch.clamp(torch.floor(boxes[:, 1]) - 1, min=0),
                        torch.clamp(torch.ceil(boxes[:, 2]) + 1, max=width),
                        torch.clamp(torch.ceil(boxes[:, 3]) + 1, max=height)],
                       dim=1).to(torch.int64).tolist()
    return windows


def paste_mask(mask: Tensor, box: Tensor, window: List[int]) -> Tensor:
    """One (1, M, M) mask's probabilities over its paste ``window`` only, (1, y1 - y0, x1 - x0):
    ``grid_sample`` (bilinear, align_corners=False) at pixel centres relative to the float box.
    The window must not be empty."""
    mask, box = float32_if_half(mask), float32_if_half(box)
    x0, y0, x1, y1 = box[0], box[1], box[2], box[3]
    x0_int, y0_int, x1_int, y1_int = window[0], window[1], window[2], window[3]
    img_y = torch.arange(y0_int, y1_int, device=mask.device, dtype=torch.float32) + 0.5
    img_x = torch.arange(x0_int, x1_int, device=mask.device, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    img_y = torch.nan_to_num(img_y, nan=0.0, posinf=0.0, neginf=0.0)
    img_x = torch.nan_to_num(img_x, nan=0.0, posinf=0.0, neginf=0.0)
    gx = img_x[None, :].expand(img_y.shape[0], img_x.shape[0])
    gy = img_y[:, None].expand(img_y.shape[0], img_x.shape[0])
    grid = torch.stack([gx, gy], dim=2)[None]
    pasted = F.grid_sample(mask[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return pasted[0].to(mask.dtype)


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int,
                threshold: Optional[float] = 0.5) -> Tensor:
    """Paste (N, 1, M, M) mask probabilities into an (N, 1, height, width) image, as the reference:
    each mask over its box's pixels +-1 (``paste_windows``, ``paste_mask``), then ``>= threshold``
    (``None`` keeps probabilities)."""
    masks = float32_if_half(masks)
    out = masks.new_zeros((masks.shape[0], 1, height, width))
    for i, window in enumerate(paste_windows(boxes, height, width)):
        x0, y0, x1, y1 = window[0], window[1], window[2], window[3]
        if x1 > x0 and y1 > y0:
            out[i, :, y0:y1, x0:x1] = paste_mask(masks[i], boxes[i], window)
    if threshold is not None:
        out = (out >= threshold).to(out.dtype)
    return out
