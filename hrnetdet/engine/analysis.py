"""Error analysis written by ``hrnetdet eval``: a confusion matrix with a background row and column,
and per-class precision-recall curves from pycocotools' accumulated precision array, each as PNG
and JSON."""
import json
import os
from collections import defaultdict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from ..io import atomic_write, atomic_write_text
from .curves import pyplot


def _xyxy(xywh: Sequence[Sequence[float]]) -> torch.Tensor:
    b = torch.as_tensor(xywh, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([b[:, :2], b[:, :2] + b[:, 2:]], dim=1)


def confusion_matrix(coco: COCO, results: List[dict], cat_ids: Sequence[int], *, iou_thresh: float = 0.5,
                     score_thresh: float = 0.3) -> np.ndarray:
    """(K + 1) x (K + 1) counts, rows = ground truth, columns = prediction, index 0 = background.

    Per image, detections scoring at least ``score_thresh`` are matched to ground-truth boxes of any
    class greedily by score (IoU at least ``iou_thresh``, each box used once); a matched pair counts
    at [true class, predicted class], an unmatched ground truth at [class, background] (missed) and
    an unmatched detection at [background, class] (false alarm). Crowd boxes are left out.
    """
    index = {cid: i + 1 for i, cid in enumerate(cat_ids)}
    matrix = np.zeros((len(cat_ids) + 1,) * 2, dtype=np.int64)
    by_image: Dict[int, List[dict]] = defaultdict(list)
    for r in results:
        if r["score"] >= score_thresh:
            by_image[r["image_id"]].append(r)
    for image_id in coco.getImgIds():
        gts = [a for a in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])) if not a.get("iscrowd", 0)]
        dets = sorted(by_image.get(image_id, []), key=lambda r: -r["score"])
        gt_cls = [index[a["category_id"]] for a in gts]
        used = [False] * len(gts)
        # read once as Python floats: element-wise tensor indexing cost ~20x more in this loop
        iou = (box_iou(_xyxy([d["bbox"] for d in dets]), _xyxy([a["bbox"] for a in gts])).tolist()
               if dets and gts else None)
        for i, d in enumerate(dets):
            best, best_j = iou_thresh, -1
            for j in range(len(gts)):
                if not used[j] and iou is not None and iou[i][j] >= best:
                    best, best_j = iou[i][j], j
            if best_j >= 0:
                used[best_j] = True
                matrix[gt_cls[best_j], index[d["category_id"]]] += 1
            else:
                matrix[0, index[d["category_id"]]] += 1
        for j, u in enumerate(used):
            if not u:
                matrix[gt_cls[j], 0] += 1
    return matrix


def pr_curves(ev: Optional[COCOeval], names: Sequence[str]) -> Dict[str, Any]:
    """Per class, precision at pycocotools' 101 recall points, at IoU 0.50 and 0.75 (area all, 100
    detections per image): ``ev.eval["precision"]`` after ``accumulate()``; -1 (no ground truth)
    becomes None. Without detections (``ev`` None) every precision is 0."""
    if ev is None:
        zeros = {"0.50": [0.0] * 101, "0.75": [0.0] * 101}
        return {"recall": np.linspace(0.0, 1.0, 101).tolist(), "precision": {n: dict(zeros) for n in names}}
    precision = ev.eval["precision"]  # (T, R, K, A, M)
    thresholds = [round(float(t), 2) for t in ev.params.iouThrs]
    curves = {}
    for k, name in enumerate(names):
        curves[name] = {}
        for iou in (0.5, 0.75):
            p = precision[thresholds.index(iou), :, k, 0, -1]
            curves[name][f"{iou:.2f}"] = [None if v < 0 else float(v) for v in p]
    return {"recall": [float(r) for r in ev.params.recThrs], "precision": curves}


def write_confusion_matrix(out_dir: str, matrix: np.ndarray, names: Sequence[str]) -> List[str]:
    """confusion_matrix.json and .png (colour: fraction of the ground-truth row); returns the paths."""
    plt = pyplot()
    labels = ["background", *names]
    paths = [os.path.join(out_dir, "confusion_matrix.json"), os.path.join(out_dir, "confusion_matrix.png")]
    cm = {"rows": "ground truth", "columns": "prediction", "labels": labels, "matrix": matrix.tolist()}
    atomic_write_text(paths[0], json.dumps(cm, indent=1))
    size = min(2 + 0.45 * len(labels), 24)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    shown = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)  # row-normalised colour
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the row")
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    if len(labels) <= 30:
        for (i, j), v in np.ndenumerate(matrix):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                        color="white" if shown[i, j] > 0.5 else "black")
    fig.tight_layout()
    atomic_write(paths[1], lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return paths


def write_pr_curves(out_dir: str, curves: Dict[str, Any], names: Sequence[str], iou_type: str) -> List[str]:
    """pr_curves_{iou_type}.json (IoU 0.50 and 0.75) and .png (IoU 0.50); returns the paths."""
    plt = pyplot()
    paths = [os.path.join(out_dir, f"pr_curves_{iou_type}.json"), os.path.join(out_dir, f"pr_curves_{iou_type}.png")]
    atomic_write_text(paths[0], json.dumps(curves))
    fig, ax = plt.subplots(figsize=(7, 5))
    for name in names:
        p = [np.nan if v is None else v for v in curves["precision"][name]["0.50"]]
        if not all(np.isnan(p)):
            ax.plot(curves["recall"], p, label=name, lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"{iou_type} precision-recall at IoU 0.50")
    ax.grid(alpha=0.3)
    if len(names) <= 20:
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(paths[1], lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return paths
