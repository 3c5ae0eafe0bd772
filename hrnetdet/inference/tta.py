"""Test-time augmentation: the image at several test scales, each also flipped horizontally.

Two-stage detectors (Faster/Mask R-CNN, Cascade R-CNN, Cascade Mask R-CNN, HTC) merge the passes
as the reference's ``aug_test`` does: every pass's RPN proposals are mapped back to the image,
pooled and NMS-ed into one proposal set; every pass scores that same set with its own features
(cascades through all their stages); the boxes and class probabilities are averaged over the
passes before the final class-wise NMS; masks are predicted on the final boxes in every pass,
flipped back, averaged and pasted once. FCOS merges the passes' final detections by class-wise NMS
(mmdetection 3.x's ``DetTTAModel`` rule). Scales multiply the model's own test scale (short and
long side).
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import clip_boxes_to_image

from ..heads.cascade import CascadeRoIHeads, average
from ..heads.masks import paste_masks
from ..heads.nms import batched_nms
from ..heads.roi_heads import label_masks
from .slicing import test_scale

SCALES = (0.8, 1.0, 1.2)


class Pass(NamedTuple):
    """One augmented view: its features, resized size (h, w), per-axis scale and flip."""
    features: Dict[str, Tensor]
    size: Tuple[int, int]
    scale: Tensor  # (4,) x, y, x, y
    flipped: bool
    semantic: Optional[Tensor]


def flip_boxes(boxes: Tensor, width: float) -> Tensor:
    """Boxes (..., 4) mirrored in an image ``width`` pixels wide (x -> width - x)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack([width - x1, y0, width - x0, y1], dim=-1)


def augmentations(scales: Sequence[float], flip: bool) -> List[Tuple[float, bool]]:
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive factors of the test scale, got {scales}")
    return [(float(s), f) for s in scales for f in ((False, True) if flip else (False,))]


def _with_scale(model: nn.Module, scale: float):
    t = model.transform
    return test_scale(model, float(t.min_size[-1]) * scale, float(t.max_size) * scale)


@torch.no_grad()
def tta_predict(model: nn.Module, image: Tensor, *, scales: Sequence[float] = SCALES,
                flip: bool = True) -> Dict[str, Tensor]:
    """Detections on one CHW image from every (scale, flip) pass, merged as the module docstring
    says; the torchvision contract's result in image pixels."""
    if image.dim() != 3:
        raise ValueError(f"expected one CHW image, got shape {list(image.shape)}")
    augs = augmentations(scales, flip)
    if hasattr(model, "rpn") and hasattr(model, "roi_heads"):
        return _two_stage(model, image, augs)
    return _nms_over_passes(model, image, augs)


def _nms_over_passes(model: nn.Module, image: Tensor, augs: Sequence[Tuple[float, bool]]) -> Dict[str, Tensor]:
    width = image.shape[-1]
    outputs = []
    for scale, flipped in augs:
        with _with_scale(model, scale):
            out = model([image.flip(-1) if flipped else image])[0]
        if flipped:
            out["boxes"] = flip_boxes(out["boxes"], width)
            if "masks" in out:
                out["masks"] = out["masks"].flip(-1)
        outputs.append(out)
    merged = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
    head = model.head
    keep = batched_nms(merged["boxes"], merged["scores"], merged["labels"], head.nms_thresh)
    return {k: v[keep[: head.detections_per_img]] for k, v in merged.items()}


def _run_pass(model: nn.Module, image: Tensor, scale: float, flipped: bool) -> Tuple[Pass, ImageList]:
    with _with_scale(model, scale):
        images, _ = model.transform([image.flip(-1) if flipped else image])
    features = model.backbone(images.tensors)
    h, w = images.image_sizes[0]
    ratio = image.new_tensor([w / image.shape[-1], h / image.shape[-2]] * 2)
    semantic = None
    if isinstance(model.roi_heads, CascadeRoIHeads) and model.roi_heads.semantic_head is not None:
        _, semantic = model.roi_heads.semantic_head(list(features.values()))
    return Pass(features, (h, w), ratio, flipped, semantic), images


def _to_image(boxes: Tensor, p: Pass, width: int) -> Tensor:
    boxes = boxes / p.scale
    return flip_boxes(boxes, width) if p.flipped else boxes


def _to_pass(boxes: Tensor, p: Pass, width: int) -> Tensor:
    boxes = flip_boxes(boxes, width) if p.flipped else boxes
    return boxes * p.scale


def _proposals(rpn: nn.Module, images: ImageList, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
    """The RPN's test-time proposals of one image and their objectness probabilities."""
    feats = list(features.values())
    objectness, deltas = rpn.head(feats)
    anchors = rpn.anchor_generator(images, feats)
    per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = rpn.box_coder.decode(deltas.detach(), anchors).view(1, -1, 4)
    boxes, scores = rpn.filter_proposals(proposals, objectness, images.image_sizes, per_level)
    return boxes[0], scores[0]


def _box_predictions(roi_heads: nn.Module, p: Pass, rois: Tensor) -> Tuple[Tensor, Tensor, nn.Module]:
    """Per-class boxes (N, K, 4) in the pass's frame, class probabilities (N, K) and the head
    whose thresholds apply."""
    if isinstance(roi_heads, CascadeRoIHeads):
        logits, deltas, last_rois = roi_heads.box_scores(p.features, [rois], [p.size], p.semantic)
        rois, head = last_rois[0], roi_heads.stages[-1]
    else:
        head = roi_heads
        logits, deltas = head.box_predictor(head.box_head(head.box_roi_pool(p.features, [rois], [p.size])))
    boxes = clip_boxes_to_image(head.box_coder.decode(deltas, [rois]), p.size)
    return boxes, F.softmax(logits, -1), head


def _mask_probs(roi_heads: nn.Module, p: Pass, boxes: Tensor, labels: Tensor) -> Tensor:
    if isinstance(roi_heads, CascadeRoIHeads):
        return roi_heads.mask_probs(p.features, [boxes], [labels], [p.size], p.semantic)[0]
    return label_masks(roi_heads.mask_logits(p.features, [boxes], [p.size]), [labels])[0]


def _two_stage(model: nn.Module, image: Tensor, augs: Sequence[Tuple[float, bool]]) -> Dict[str, Tensor]:
    height, width = int(image.shape[-2]), int(image.shape[-1])
    passes, proposals, objectness = [], [], []
    for scale, flipped in augs:
        p, images = _run_pass(model, image, scale, flipped)
        boxes, scores = _proposals(model.rpn, images, p.features)
        passes.append(p)
        proposals.append(_to_image(boxes, p, width))
        objectness.append(scores)
    # The reference's merge_aug_proposals: pooled, one NMS, the best post_nms_top_n kept.
    boxes, scores = torch.cat(proposals), torch.cat(objectness)
    keep = batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.long), model.rpn.nms_thresh)
    rois = boxes[keep[: model.rpn.post_nms_top_n()]]

    roi_heads = model.roi_heads
    all_boxes, all_probs = [], []
    for p in passes:
        boxes, probs, head = _box_predictions(roi_heads, p, _to_pass(rois, p, width))
        all_boxes.append(_to_image(boxes, p, width))
        all_probs.append(probs)
    boxes, scores, labels = head.multiclass_nms(average(all_boxes), average(all_probs), (height, width))
    result = {"boxes": boxes, "labels": labels, "scores": scores}
    if roi_heads.has_mask():
        probs = []
        for p in passes:
            m = _mask_probs(roi_heads, p, _to_pass(boxes, p, width), labels)
            probs.append(m.flip(-1) if p.flipped else m)
        result["masks"] = paste_masks(average(probs), boxes, height, width, model.transform.mask_thresh)
    return result
