"""The one COCO-results writer (used by evaluation and prediction): xywh boxes, the dataset's own
category ids, RLE masks."""
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .categories import category_ids_for

MASK_FORMATS = ("uint8", "rle")  # how predictions carry masks: (N, 1, H, W) uint8 or COCO RLE dicts


def category_ids_of(model: nn.Module) -> Optional[List[int]]:
    """The dataset category id of each label 1..K: ``categories.category_ids_for`` of the model's
    categories and ``category_ids`` (its dataset's, or COCO's for COCO's categories, else the label);
    None for a model without categories."""
    categories = list(getattr(model, "categories", None) or [])
    if not categories:
        return None
    return category_ids_for(categories, getattr(model, "category_ids", None))[1:]


def mask_rle(mask: Any) -> Dict[str, Any]:
    """One (H, W) or (1, H, W) mask (bool, uint8, or probabilities thresholded at 0.5) as a COCO
    compressed RLE with ``counts`` as text."""
    from pycocotools import mask as mask_utils

    if isinstance(mask, torch.Tensor):
        mask = (mask >= 0.5 if mask.is_floating_point() else mask > 0).cpu().numpy()
    mask = np.asarray(mask).reshape(np.asarray(mask).shape[-2:])
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def region_rle(region: Any, x0: int, y0: int, height: int, width: int) -> Dict[str, Any]:
    """The COCO compressed RLE (as ``mask_rle``) of a ``height`` x ``width`` mask that is zero
    outside ``region`` ((h, w) bool or 0/1, placed with its top-left pixel at ``x0, y0``), built
    from the region's columns: no full-image array, so thousands of masks fit in memory."""
    from pycocotools import mask as mask_utils

    region = np.asarray(region).astype(bool)
    h, w = region.shape
    band = np.zeros((w, height), dtype=bool)  # the region's columns, each one image column long
    band[:, y0:y0 + h] = region.T
    flat = band.ravel()  # column-major order, as COCO's RLE reads a mask
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist() if flat.size else [0]
    if flat.size and flat[0]:  # counts start with a run of zeros
        runs.insert(0, 0)
    runs[0] += x0 * height  # the columns left of the region
    after = (width - x0 - w) * height  # and right of it
    if len(runs) % 2:
        runs[-1] += after
    elif after:
        runs.append(after)
    rle = mask_utils.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def coco_records(pred: Dict[str, Any], image_id: int, category_ids: Optional[Sequence[int]],
                 file_name: Optional[str] = None) -> List[Dict[str, Any]]:
    """One image's detections as COCO result records: ``bbox`` xywh (3 decimals), ``score``
    (5 decimals), ``category_id`` from ``category_ids[label - 1]`` (the label when None), ``segmentation`` RLE when the
    prediction has masks (tensors, or RLE dicts already), ``file_name`` when given."""
    boxes = torch.as_tensor(pred["boxes"]).detach().float().cpu()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    labels = torch.as_tensor(pred["labels"]).tolist()
    scores = torch.as_tensor(pred["scores"]).detach().float().cpu().tolist()
    masks = pred.get("masks")
    names = pred.get("names")
    records = []
    for i, (box, label, score) in enumerate(zip(xywh, labels, scores)):
        label = int(label)
        if category_ids is not None and not 1 <= label <= len(category_ids):
            raise ValueError(f"image {image_id}: label {label} has no category id ({len(category_ids)} known)")
        category_id = label if category_ids is None else int(category_ids[label - 1])
        rec: Dict[str, Any] = {"image_id": image_id, "category_id": category_id,
                               "bbox": [round(v, 3) for v in box], "score": round(score, 5)}
        if file_name is not None:
            rec["file_name"] = file_name
        if names is not None:
            rec["category_name"] = names[i]
        if masks is not None:
            rec["segmentation"] = masks[i] if isinstance(masks[i], dict) else mask_rle(masks[i])
        records.append(rec)
    return records
