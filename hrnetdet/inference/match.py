"""One-to-one matching of two detection sets, the parity criterion between two implementations
(or between a model and its exported / optimised copy), and the thresholds of that criterion: the
parity harness (tools/parity/compare.py), the tests, the benchmarks and export-time checks all use
these."""
from typing import Dict

import torch
from torch import Tensor
from torchvision.ops import box_iou

BOX_IOU = 0.98      # a matched detection overlaps its reference with at least this box IoU,
SCORE_TOL = 0.01    # scores within this,
MASK_IOU = 0.9      # and, for mask models, at least this mask IoU;
MIN_MATCHED = 0.98  # two sets agree when at least this share of the reference's detections match.


def mask_iou(a: Tensor, b: Tensor) -> float:
    """IoU of two masks binarised at 0.5; two empty masks agree."""
    a, b = a >= 0.5, b >= 0.5
    union = int((a | b).sum())
    return int((a & b).sum()) / union if union else 1.0


def match_detections(ref: Dict[str, Tensor], det: Dict[str, Tensor], iou_thresh: float = BOX_IOU,
                     score_tol: float = SCORE_TOL, mask_iou_thresh: float = MASK_IOU) -> Dict[str, float]:
    """Greedily match ``ref`` detections (highest score first) to unused ``det`` detections of the
    same label with box IoU >= ``iou_thresh`` and |score difference| <= ``score_tol`` (and mask IoU
    >= ``mask_iou_thresh`` when both carry masks), taking the candidate of highest IoU. Both are
    {boxes (N, 4), labels, scores[, masks (N, 1, H, W)]}; identical boxes match even when empty.

    Returns n_ref, n_det, n_matched, matched_frac (1.0 when ``ref`` is empty), and the worst
    matched box IoU and score difference.
    """
    rb, rl, rs = ref["boxes"].double().reshape(-1, 4), ref["labels"], ref["scores"].double()
    db, dl, ds = det["boxes"].double().reshape(-1, 4), det["labels"], det["scores"].double()
    order = torch.argsort(rs, descending=True, stable=True)
    rb, rl, rs = rb[order], rl[order], rs[order]
    ious = torch.where((rb[:, None] == db[None]).all(-1), torch.ones(()).double(), box_iou(rb, db))
    eligible = (rl[:, None] == dl[None, :]) & (ious >= iou_thresh) & ((rs[:, None] - ds[None, :]).abs() <= score_tol)
    if "masks" in ref and "masks" in det:
        ref_masks = ref["masks"][order]
        for i, j in eligible.nonzero().tolist():
            eligible[i, j] = mask_iou(ref_masks[i], det["masks"][j]) >= mask_iou_thresh
    used = torch.zeros(len(ds), dtype=torch.bool)
    min_iou, max_sdiff, n_matched = 1.0, 0.0, 0
    for i in range(len(rs)):
        cand = eligible[i] & ~used
        if cand.any():
            j = int(torch.where(cand, ious[i], torch.full_like(ious[i], -1.0)).argmax())
            used[j] = True
            n_matched += 1
            min_iou = min(min_iou, float(ious[i, j]))
            max_sdiff = max(max_sdiff, float((rs[i] - ds[j]).abs()))
    return {"n_ref": len(rs), "n_det": len(ds), "n_matched": n_matched,
            "matched_frac": n_matched / len(rs) if len(rs) else 1.0,
            "min_box_iou": min_iou, "max_score_diff": max_sdiff}
