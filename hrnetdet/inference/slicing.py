"""Sliced inference for large images with small objects.

Resized to the model's test scale (short side 800), a 3000x2000 photo shrinks its 10-40 px objects
below what a detector finds. Here the image is cut into overlapping SxS tiles that the model sees at
native resolution (batched), optionally plus one pass over the whole resized image for the large
objects; detections are shifted back to image coordinates and merged per class. A detection that
touches a tile edge inside the image is *cut*: it is dropped when a detection of the same class
that is not cut covers it, so an object seen whole by a neighbouring tile is reported once and
whole. What remains is merged by NMS or by greedy non-maximum merging (each highest-scoring box
absorbs the same-class boxes overlapping it and grows to their union, masks OR-ed).
benchmarks/slicing.py measures both.
"""
import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from ..heads.nms import batched_nms

Window = Tuple[int, int, int, int]  # x0, y0, x1, y1: pixels, end exclusive
MERGES = ("nms", "greedy")
CUT_MARGIN = 2.0      # px: a box this close to a tile edge inside the image is cut by it
COVERED_FRACTION = 0.5  # a cut box is dropped when an uncut box covers this fraction of it


@contextlib.contextmanager
def test_scale(model: nn.Module, min_size: float, max_size: float) -> Iterator[None]:
    """Temporarily run ``model`` with another test scale (the transform's short and long side)."""
    transform = model.transform
    saved = transform.min_size, transform.max_size
    transform.min_size, transform.max_size = (min_size,), max_size
    try:
        yield
    finally:
        transform.min_size, transform.max_size = saved


def tile_windows(height: int, width: int, size: int, overlap: float = 0.2) -> List[Window]:
    """SxS windows covering the image, consecutive ones sharing ``overlap`` of S; the last
    window of a row or column is moved back to end at the image edge, so every window is SxS
    (or the whole side when the image is smaller than S)."""
    if size < 1:
        raise ValueError(f"slice size must be a positive number of pixels, got {size}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    step = max(1, round(size * (1 - overlap)))

    def starts(side: int) -> List[int]:
        if side <= size:
            return [0]
        return list(range(0, side - size, step)) + [side - size]

    return [(x, y, min(x + size, width), min(y + size, height))
            for y in starts(height) for x in starts(width)]


def _cut(boxes: Tensor, window: Window, height: int, width: int) -> Tensor:
    """Whether each (image-coordinate) box touches an edge of ``window`` that lies inside the image."""
    x0, y0, x1, y1 = window
    cut = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    if x0 > 0:
        cut |= boxes[:, 0] <= x0 + CUT_MARGIN
    if y0 > 0:
        cut |= boxes[:, 1] <= y0 + CUT_MARGIN
    if x1 < width:
        cut |= boxes[:, 2] >= x1 - CUT_MARGIN
    if y1 < height:
        cut |= boxes[:, 3] >= y1 - CUT_MARGIN
    return cut


def _covered(boxes: Tensor, labels: Tensor, cut: Tensor) -> Tensor:
    """Cut boxes that an uncut box of the same class covers (intersection over the cut box's area)."""
    drop = torch.zeros_like(cut)
    ci, wi = torch.where(cut)[0], torch.where(~cut)[0]
    if ci.numel() == 0 or wi.numel() == 0:
        return drop
    a, b = boxes[ci], boxes[wi]
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])).clamp(min=1e-6)
    covers = (inter / area[:, None] >= COVERED_FRACTION) & (labels[ci][:, None] == labels[wi][None, :])
    drop[ci] = covers.any(dim=1)
    return drop


def greedy_merge(boxes: Tensor, scores: Tensor, labels: Tensor, iou_thresh: float) -> List[Tensor]:
    """Greedy non-maximum merging: by decreasing score, each box not yet absorbed absorbs the
    same-class boxes with IoU above ``iou_thresh``. Returns one index tensor per merged detection,
    its highest-scoring member first."""
    order = scores.argsort(descending=True)
    boxes, labels = boxes[order], labels[order]
    overlaps = (box_iou(boxes, boxes) > iou_thresh) & (labels[:, None] == labels[None, :])
    free = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    groups = []
    for i in range(len(order)):
        if free[i]:
            members = torch.where(overlaps[i] & free)[0]
            free[members] = False
            groups.append(order[members])
    return groups


def merge_detections(boxes: Tensor, scores: Tensor, labels: Tensor, cut: Tensor, merge: str = "nms",
                     iou_thresh: float = 0.5) -> List[Tensor]:
    """Which detections make each merged one (see the module docstring), best first."""
    if merge not in MERGES:
        raise ValueError(f"merge={merge!r}; expected one of {MERGES}")
    alive = torch.where(~_covered(boxes, labels, cut))[0]
    if merge == "nms":
        keep = batched_nms(boxes[alive], scores[alive], labels[alive], iou_thresh)
        return [alive[k:k + 1] for k in keep]
    groups = greedy_merge(boxes[alive], scores[alive], labels[alive], iou_thresh)
    return [alive[g] for g in groups]


@torch.no_grad()
def sliced_predict(model: nn.Module, image: Tensor, size: int, overlap: float = 0.2, *,
                   full_image: bool = True, merge: str = "nms", iou_thresh: float = 0.5,
                   batch_size: int = 4) -> Dict[str, Tensor]:
    """Detections on one CHW image from SxS tiles (``size``) at native resolution, plus the whole
    image at the model's test scale when ``full_image``; the torchvision contract's result
    ({boxes, labels, scores[, masks (N, 1, H, W)]}) in image pixels, best first."""
    if image.dim() != 3:
        raise ValueError(f"expected one CHW image, got shape {list(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    height, width = int(image.shape[-2]), int(image.shape[-1])
    windows = tile_windows(height, width, size, overlap)
    tile_outputs = predict_tiles(model, image, windows, batch_size)
    full = model([image])[0] if full_image and len(windows) > 1 else None
    return merge_tiles(tile_outputs, windows, height, width, full, merge=merge, iou_thresh=iou_thresh)


@torch.no_grad()
def predict_tiles(model: nn.Module, image: Tensor, windows: Sequence[Window], batch_size: int = 4
                  ) -> List[Dict[str, Tensor]]:
    """The model's result on each window of ``image`` (all of one size), at native resolution,
    in tile pixels."""
    outputs: List[Dict[str, Tensor]] = []
    tile_h, tile_w = windows[0][3] - windows[0][1], windows[0][2] - windows[0][0]
    with test_scale(model, min(tile_h, tile_w), max(tile_h, tile_w)):  # scale 1
        for i in range(0, len(windows), batch_size):
            outputs += model([image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in windows[i:i + batch_size]])
    return outputs


def merge_tiles(tile_outputs: Sequence[Dict[str, Tensor]], windows: Sequence[Window], height: int, width: int,
                full: Optional[Dict[str, Tensor]] = None, *, merge: str = "nms", iou_thresh: float = 0.5
                ) -> Dict[str, Tensor]:
    """One image's result from its tiles' results (in tile pixels, masks pasted into the tile) and
    optionally a full-image result: shifted to image pixels, cut boxes flagged, merged per class."""
    parts = []
    for window, out in zip(windows, tile_outputs):
        out = dict(out, boxes=out["boxes"] + out["boxes"].new_tensor(window[:2] * 2))
        out["cut"] = _cut(out["boxes"], window, height, width)
        parts.append(out)
    sources: List[Optional[Window]] = list(windows)
    if full is not None:
        parts.append(dict(full, cut=torch.zeros(len(full["boxes"]), dtype=torch.bool, device=full["boxes"].device)))
        sources.append(None)
    boxes, scores, labels, cut = (torch.cat([p[k] for p in parts]) for k in ("boxes", "scores", "labels", "cut"))
    groups = merge_detections(boxes, scores, labels, cut, merge, iou_thresh)
    best = [int(g[0]) for g in groups]
    result = {
        "boxes": torch.stack([torch.cat([boxes[g, :2].min(0).values, boxes[g, 2:].max(0).values])
                              for g in groups]) if groups else boxes[:0],
        "labels": labels[best],
        "scores": scores[best],
    }
    if "masks" in parts[0]:
        result["masks"] = _paste_group_masks(parts, sources, groups, height, width)
    return result


def _paste_group_masks(parts: Sequence[Dict[str, Tensor]], sources: Sequence[Optional[Window]],
                       groups: Sequence[Tensor], height: int, width: int) -> Tensor:
    """Each merged detection's mask in the full image: its members' masks placed at their tiles
    and combined by maximum (OR for thresholded masks)."""
    owner = torch.cat([torch.full((len(p["boxes"]),), i, dtype=torch.long) for i, p in enumerate(parts)])
    offset = torch.cat([torch.arange(len(p["boxes"])) for p in parts])
    ref = parts[0]["masks"]
    out = ref.new_zeros((len(groups), 1, height, width))
    for k, group in enumerate(groups):
        for j in group.tolist():
            mask = parts[int(owner[j])]["masks"][int(offset[j])]
            window = sources[int(owner[j])]
            x0, y0, x1, y1 = window if window is not None else (0, 0, width, height)
            region = out[k, :, y0:y1, x0:x1]
            region.copy_(torch.maximum(region, mask))
    return out
