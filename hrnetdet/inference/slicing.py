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

Memory stays bounded by the detections' boxes, not by detections x image: the model returns each
mask as its (M, M) probabilities in the box's frame, and only the merged detections' masks are
pasted, one at a time, into the box's own pixels, thresholded to bool; they leave as uint8 image
masks or straight as RLE (benchmarks/slicing_memory.py measures the peak).
"""
import contextlib
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from ..data.results import region_rle
from ..detectors.settings import temporary_settings
from ..heads.masks import paste_mask, paste_windows
from ..heads.nms import batched_nms
from .options import PredictOptions

Window = Tuple[int, int, int, int]  # x0, y0, x1, y1: pixels, end exclusive
MERGES = ("nms", "greedy")
CUT_MARGIN = 2.0      # px: a box this close to a tile edge inside the image is cut by it
COVERED_FRACTION = 0.5  # a cut box is dropped when an uncut box covers this fraction of it


@contextlib.contextmanager
def test_scale(model: nn.Module, min_size: float, max_size: float) -> Iterator[None]:
    """Temporarily run ``model`` with another test scale (the transform's short and long side)."""
    with temporary_settings(model, min_size=(min_size,), max_size=max_size):
        yield


@contextlib.contextmanager
def per_box_masks(model: nn.Module) -> Iterator[None]:
    """Temporarily leave a mask model's masks as the heads' (N, 1, M, M) probabilities in each
    box's frame, unpasted: an image-sized float mask per detection is what sliced inference avoids."""
    transform = model.transform
    saved = transform.paste
    transform.paste = False
    try:
        yield
    finally:
        transform.paste = saved


def tile_windows(height: int, width: int, size: int, overlap: float = 0.2) -> List[Window]:
    """SxS windows covering the image, consecutive ones sharing ``overlap`` of S; the last
    window of a row or column is moved back to end at the image edge, so every window is SxS
    (or the whole side when the image is smaller than S)."""
    PredictOptions(slice=size, overlap=overlap)  # predict's rules, for direct callers
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
                   batch_size: int = 4, mask_format: str = "uint8") -> Dict[str, Any]:
    """Detections on one CHW image from SxS tiles (``size``) at native resolution, plus the whole
    image at the model's test scale when ``full_image``; the torchvision contract's result
    ({boxes, labels, scores[, masks]}) in image pixels, best first. Masks are binary (at the
    model's mask threshold, 0.5 without one): (N, 1, H, W) uint8, or with ``mask_format="rle"``
    a list of COCO RLE dicts, encoded without an image-sized array per detection."""
    if image.dim() != 3:
        raise ValueError(f"expected one CHW image, got shape {list(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    PredictOptions(slice=size, overlap=overlap, full_image=full_image, mask_format=mask_format)
    height, width = int(image.shape[-2]), int(image.shape[-1])
    windows = tile_windows(height, width, size, overlap)
    tile_outputs = predict_tiles(model, image, windows, batch_size)
    with per_box_masks(model):
        full = model([image])[0] if full_image and len(windows) > 1 else None
    mask_thresh = model.transform.mask_thresh
    return merge_tiles(tile_outputs, windows, height, width, full, merge=merge, iou_thresh=iou_thresh,
                       mask_format=mask_format, mask_thresh=0.5 if mask_thresh is None else mask_thresh)


@torch.no_grad()
def predict_tiles(model: nn.Module, image: Tensor, windows: Sequence[Window], batch_size: int = 4
                  ) -> List[Dict[str, Tensor]]:
    """The model's result on each window of ``image`` (all of one size), at native resolution,
    in tile pixels; masks unpasted (``per_box_masks``), as ``merge_tiles`` takes them."""
    outputs: List[Dict[str, Tensor]] = []
    tile_h, tile_w = windows[0][3] - windows[0][1], windows[0][2] - windows[0][0]
    with test_scale(model, min(tile_h, tile_w), max(tile_h, tile_w)), per_box_masks(model):  # scale 1
        for i in range(0, len(windows), batch_size):
            outputs += model([image[:, y0:y1, x0:x1] for x0, y0, x1, y1 in windows[i:i + batch_size]])
    return outputs


def merge_tiles(tile_outputs: Sequence[Dict[str, Tensor]], windows: Sequence[Window], height: int, width: int,
                full: Optional[Dict[str, Tensor]] = None, *, merge: str = "nms", iou_thresh: float = 0.5,
                mask_format: str = "uint8", mask_thresh: float = 0.5) -> Dict[str, Any]:
    """One image's result from its tiles' results (in tile pixels, masks as (N, 1, M, M)
    probabilities in each box's frame) and optionally a full-image result (image pixels, masks
    likewise): shifted to image pixels, cut boxes flagged, merged per class; masks pasted at
    ``mask_thresh`` (see ``sliced_predict``)."""
    frames = list(tile_outputs) + ([full] if full is not None else [])
    origins = [window[:2] for window in windows] + ([(0, 0)] if full is not None else [])
    sizes = [(y1 - y0, x1 - x0) for x0, y0, x1, y1 in windows] + ([(height, width)] if full is not None else [])
    shifted = [out["boxes"] + out["boxes"].new_tensor(origin * 2) for out, origin in zip(frames, origins)]
    cut = [_cut(b, window, height, width) for b, window in zip(shifted, windows)]  # the full image cuts nothing
    cut += [torch.zeros(len(b), dtype=torch.bool, device=b.device) for b in shifted[len(windows):]]
    boxes, cut = torch.cat(shifted), torch.cat(cut)
    scores, labels = (torch.cat([out[k] for out in frames]) for k in ("scores", "labels"))
    groups = merge_detections(boxes, scores, labels, cut, merge, iou_thresh)
    best = [int(g[0]) for g in groups]
    result: Dict[str, Any] = {
        "boxes": torch.stack([torch.cat([boxes[g, :2].min(0).values, boxes[g, 2:].max(0).values])
                              for g in groups]) if groups else boxes[:0],
        "labels": labels[best],
        "scores": scores[best],
    }
    if "masks" in frames[0]:
        masks = group_masks(frames, origins, sizes, groups, mask_thresh)
        result["masks"] = (_image_masks(masks, len(groups), height, width, boxes.device) if mask_format == "uint8"
                           else [region_rle(m.cpu().numpy(), x0, y0, height, width) for m, (x0, y0) in masks])
    return result


Placed = Tuple[Tensor, Tuple[int, int]]  # a bool (h, w) mask region and its top-left pixel (x, y) in the image


def group_masks(frames: Sequence[Dict[str, Tensor]], origins: Sequence[Tuple[int, int]],
                sizes: Sequence[Tuple[int, int]], groups: Sequence[Tensor], mask_thresh: float) -> Iterator[Placed]:
    """Each merged detection's mask, one at a time, over the union of its members' paste windows: every member
    pasted in its own frame (a tile, or the image; frame ``f`` has its top-left pixel at
    ``origins[f]`` and is ``sizes[f]`` (h, w)), as the model would paste it there, thresholded
    and OR-ed. Detections are numbered through the frames in order."""
    frame_of = torch.cat([torch.full((len(out["boxes"]),), f, dtype=torch.long) for f, out in enumerate(frames)])
    index_in = torch.cat([torch.arange(len(out["boxes"])) for out in frames])
    paste_at = [paste_windows(out["boxes"], *size) for out, size in zip(frames, sizes)]
    for group in groups:
        members = []
        for j in group.tolist():
            f, i = int(frame_of[j]), int(index_in[j])
            x0, y0, x1, y1 = paste_at[f][i]
            if x1 > x0 and y1 > y0:
                members.append((f, i, (x0, y0, x1, y1)))
        image_windows = [(x0 + origins[f][0], y0 + origins[f][1], x1 + origins[f][0], y1 + origins[f][1])
                         for f, _, (x0, y0, x1, y1) in members]
        if not members:
            yield torch.zeros((0, 0), dtype=torch.bool), (0, 0)
            continue
        left, top = min(w[0] for w in image_windows), min(w[1] for w in image_windows)
        right, bottom = max(w[2] for w in image_windows), max(w[3] for w in image_windows)
        region = torch.zeros((bottom - top, right - left), dtype=torch.bool, device=frames[0]["boxes"].device)
        for (f, i, window), (x0, y0, x1, y1) in zip(members, image_windows):
            pasted = paste_mask(frames[f]["masks"][i], frames[f]["boxes"][i], window)[0] >= mask_thresh
            region[y0 - top:y1 - top, x0 - left:x1 - left] |= pasted
        yield region, (left, top)


def _image_masks(placed: Iterator[Placed], count: int, height: int, width: int, device: torch.device) -> Tensor:
    """``count`` placed masks as the contract's (N, 1, H, W), in uint8: one byte per pixel and detection."""
    out = torch.zeros((count, 1, height, width), dtype=torch.uint8, device=device)
    for k, (region, (x0, y0)) in enumerate(placed):
        out[k, 0, y0:y0 + region.shape[0], x0:x0 + region.shape[1]] = region
    return out
