"""COCO evaluation with pycocotools: the usual 12 numbers for bbox (and segm for mask models), a
per-class AP table, and the predictions in COCO results format."""
import contextlib
import io
import json
import os
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import nn
from tqdm import tqdm

from ..data.coco import CocoDetection, collate
from ..data.results import coco_records
from ..detectors import has_masks
from ..inference.modes import detect
from ..inference.options import PredictOptions
from ..io import atomic_write_text
from .analysis import confusion_matrix, pr_curves, write_confusion_matrix, write_pr_curves

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# The area that sorts a segm detection into small/medium/large: its box's (pycocotools on records that
# carry a bbox, as mmdetection and detectron2 score) or its mask's (torchmetrics, torchvision's
# reference evaluator). docs/NUMERICS.md, 'Segm area convention'.
SEGM_AREAS = ("box", "mask")


def _coco_gt(ds: CocoDetection) -> COCO:
    """A pycocotools COCO object for the dataset's images, with the 'area'/'iscrowd' defaults it needs."""
    with open(ds.ann_file) as f:
        data = json.load(f)
    for ann in data.get("annotations", []):
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2] * ann["bbox"][3]))
    data.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _per_class_ap(ev: COCOeval, names: Sequence[str]) -> Dict[str, float]:
    """AP@[.5:.95] of each category (area all, 100 detections); NaN where it has no ground truth."""
    precision = ev.eval["precision"]  # (T, R, K, A, M)
    out = {}
    for k, name in enumerate(names):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[name] = float(p.mean()) if p.size else float("nan")
    return out


def _loadable(record: dict, iou_type: str, segm_area: str) -> dict:
    """A copy of a results record for ``loadRes``, which adds keys to the records it is given; for
    segm with ``segm_area="mask"`` without its bbox, so that pycocotools takes the mask's area."""
    record = dict(record)
    if iou_type == "segm" and segm_area == "mask":
        record.pop("bbox", None)
    return record


def run_cocoeval(coco: COCO, results: List[dict], iou_type: str, image_ids: Sequence[int],
                 segm_area: str = "box") -> Optional[COCOeval]:
    """pycocotools' evaluation, accumulated and summarised, of copies of ``results`` (left as they
    are); None when nothing was detected."""
    if not results:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco.loadRes([_loadable(r, iou_type, segm_area) for r in results])
        ev = COCOeval(coco, dt, iou_type)
        ev.params.imgIds = list(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def coco_metrics(ev: Optional[COCOeval], names: Sequence[str]) -> Dict[str, Any]:
    """The 12 COCO numbers and per-class AP of an evaluation (zeros when nothing was detected)."""
    if ev is None:
        return {"stats": {n: 0.0 for n in STAT_NAMES}, "per_class": {n: 0.0 for n in names}}
    return {"stats": {n: float(v) for n, v in zip(STAT_NAMES, ev.stats)}, "per_class": _per_class_ap(ev, names)}


def format_table(metrics: Dict[str, Any]) -> str:
    """A plain-text report: the 12 numbers per IoU type, then AP per class."""
    lines = []
    types = [t for t in ("bbox", "segm") if t in metrics]
    for t in types:
        lines.append(f"{t}: " + "  ".join(f"{n}={metrics[t]['stats'][n]:.3f}" for n in STAT_NAMES))
    names = list(metrics[types[0]]["per_class"]) if types else []
    width = max([len(n) for n in names] + [8])
    lines.append(f"{'category':{width}s} " + " ".join(f"{t + ' AP':>8s}" for t in types))
    for n in names:
        lines.append(f"{n:{width}s} " + " ".join(f"{metrics[t]['per_class'][n]:8.3f}" for t in types))
    return "\n".join(lines)


def check_categories(model: nn.Module, ds: CocoDetection) -> None:
    """The model must predict the dataset's number of categories; other names only warn."""
    num_classes = len(getattr(model, "categories", []) or [])
    if num_classes and num_classes != len(ds.categories):
        raise ValueError(f"the model predicts {num_classes - 1} categories but {ds.ann_file} has "
                         f"{len(ds.categories) - 1}: build it with num_classes={len(ds.categories)}")
    if num_classes and list(model.categories[1:]) != ds.categories[1:]:
        warnings.warn(f"model categories {list(model.categories[1:])[:5]}... differ from {ds.ann_file}'s "
                      f"{ds.categories[1:6]}...; labels are mapped by position (ascending category id)")


def default_iou_types(model: nn.Module) -> Tuple[str, ...]:
    return ("bbox", "segm") if has_masks(model) else ("bbox",)


@torch.no_grad()
def evaluate(model: nn.Module, ann_file: str, image_dir: str, *, out_dir: Optional[str] = None,
             device: Optional[str] = None, batch_size: int = 1, iou_types: Optional[Sequence[str]] = None,
             num_workers: int = 0, progress: bool = True, slice: Optional[int] = None,
             overlap: float = 0.2, full_image: bool = True, tta: bool = False,
             segm_area: str = "box") -> Dict[str, Any]:
    """Run ``model`` on every image of a COCO-format dataset and score it with pycocotools.

    Labels map back to the dataset's category ids in ascending order (label 1 = smallest id), as
    ``CocoDetection`` maps them for training. ``iou_types`` defaults to bbox, plus segm for mask
    models. With ``out_dir``, writes ``predictions.json`` (COCO results), ``metrics.json`` and the
    error analysis of ``engine.analysis``: ``confusion_matrix.{json,png}`` (boxes) and per-class
    precision-recall curves ``pr_curves_{bbox,segm}.{json,png}``.

    Returns ``{"bbox": {"stats": {AP, AP50, ...}, "per_class": {name: AP}}, ["segm": ...,]
    "num_images", "num_detections"}``. ``slice``, ``overlap``, ``full_image`` and ``tta`` select
    sliced inference or test-time augmentation, as in ``predict``. ``segm_area``: the area that
    sorts segm detections into AP_small/medium/large, ``"box"`` (pycocotools on records with a
    bbox, mmdetection, detectron2) or ``"mask"`` (torchmetrics, torchvision's reference evaluator).
    """
    if segm_area not in SEGM_AREAS:
        raise ValueError(f"segm_area must be one of {SEGM_AREAS}, got {segm_area!r}")
    options = PredictOptions(slice=slice, overlap=overlap, full_image=full_image, tta=tta)
    ds = CocoDetection(ann_file, image_dir, with_masks=False)
    check_categories(model, ds)
    if iou_types is None:
        iou_types = default_iou_types(model)
    results = coco_predictions(model, ds, options, device=device, batch_size=batch_size, num_workers=num_workers,
                               progress=progress)
    metrics, evals = score(ds, results, iou_types, segm_area)
    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
        atomic_write_text(os.path.join(out_dir, "predictions.json"), json.dumps(results))
        atomic_write_text(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=2))
        names = ds.categories[1:]
        write_confusion_matrix(out_dir, confusion_matrix(evals["coco"], results, ds.cat_ids), names)
        for t in iou_types:
            write_pr_curves(out_dir, pr_curves(evals[t], names), names, t)
    return metrics


@torch.no_grad()
def coco_predictions(model: nn.Module, ds: CocoDetection, options: Optional[PredictOptions] = None, *,
                     device: Optional[str] = None, indices: Optional[Sequence[int]] = None, batch_size: int = 1,
                     num_workers: int = 0, progress: bool = True) -> List[dict]:
    """The model's detections on the dataset's images (``indices``: a shard of them) as COCO
    results records; ``options`` holds ``detect``'s slicing/TTA settings (default: plain)."""
    options = options or PredictOptions()
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval().to(device)
    subset = ds if indices is None else torch.utils.data.Subset(ds, list(indices))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers)
    results: List[dict] = []
    for images, targets in tqdm(loader, desc="evaluate", disable=not progress, dynamic_ncols=True):
        preds = detect(model, [im.to(device) for im in images], options)
        for pred, tgt in zip(preds, targets):
            results += coco_records(pred, int(tgt["image_id"]), ds.cat_ids)
    model.train(was_training)
    return results


def score(ds: CocoDetection, results: List[dict], iou_types: Sequence[str], segm_area: str = "box"
          ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """pycocotools' figures of ``results`` on every image of ``ds``: (metrics as ``evaluate`` returns
    them, {"coco": the ground truth, iou type: its COCOeval or None}); ``segm_area`` as in ``evaluate``."""
    coco = _coco_gt(ds)
    image_ids = [int(im["id"]) for im in ds.images]
    names = ds.categories[1:]
    metrics: Dict[str, Any] = {}
    evals: Dict[str, Any] = {"coco": coco}
    for t in iou_types:
        recs = results if t == "bbox" else [r for r in results if "segmentation" in r]
        evals[t] = run_cocoeval(coco, recs, t, image_ids, segm_area)
        metrics[t] = coco_metrics(evals[t], names)
    metrics["num_images"] = len(image_ids)
    metrics["num_detections"] = len(results)
    return metrics, evals
