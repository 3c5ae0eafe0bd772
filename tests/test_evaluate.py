"""Evaluation: pycocotools AP of known predictions, labels mapped back to the dataset's category
ids, masks RLE-encoded, per-class table, results file, and clear errors."""
import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from torch import nn

import hrnetdet
from hrnetdet.data import CocoDetection, make_shapes_dataset
from hrnetdet.engine.evaluate import STAT_NAMES, coco_predictions, format_table, score


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes")), "val", 6, seed=5)


class Replay(nn.Module):
    """A stand-in detector that returns given predictions, image by image, in dataset order."""

    def __init__(self, predictions, categories, masks=False):
        super().__init__()
        self.predictions = list(predictions)
        self.categories = categories
        self.masks = masks
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, images):
        out = []
        for image in images:
            pred = dict(self.predictions.pop(0))
            assert image.shape[-2:] == pred.pop("size")
            out.append(pred)
        return out


def _ground_truth_predictions(ds, shift=None):
    preds = []
    for i in range(len(ds)):
        image, t = ds[i]
        boxes = t["boxes"].clone()
        if shift is not None:  # move the boxes of one label sideways
            boxes[t["labels"] == shift[0], 0::2] += shift[1]
        p = {"size": image.shape[-2:], "boxes": boxes, "labels": t["labels"],
             "scores": torch.linspace(0.9, 0.5, len(boxes))}
        if "masks" in t:
            p["masks"] = t["masks"][:, None].float()
        preds.append(p)
    return preds


def test_ground_truth_scores_one_and_results_use_dataset_ids(shapes, tmp_path):
    ann, images = shapes
    ds = CocoDetection(ann, images, with_masks=True)
    model = Replay(_ground_truth_predictions(ds), ds.categories)
    metrics = hrnetdet.evaluate(model, ann, images, out_dir=str(tmp_path), iou_types=("bbox", "segm"), progress=False)
    for t in ("bbox", "segm"):
        assert list(metrics[t]["stats"]) == list(STAT_NAMES)
        assert metrics[t]["stats"]["AP"] == pytest.approx(1.0)
        assert all(v == pytest.approx(1.0) for v in metrics[t]["per_class"].values())
    gt = json.load(open(ann))
    results = json.load(open(tmp_path / "predictions.json"))
    assert len(results) == len(gt["annotations"]) == metrics["num_detections"]
    for r, a in zip(results, gt["annotations"]):
        assert r["image_id"] == a["image_id"] and r["category_id"] == a["category_id"]  # 3, 7, 11: not labels
        assert r["bbox"] == pytest.approx(a["bbox"])
        assert int(mask_utils.area(r["segmentation"])) == a["area"]
    assert json.load(open(tmp_path / "metrics.json"))["bbox"]["stats"]["AP"] == pytest.approx(1.0)
    table = format_table(metrics)
    assert "circle" in table and "segm AP" in table


def test_per_class_ap_isolates_a_bad_class(shapes):
    ann, images = shapes
    ds = CocoDetection(ann, images)
    model = Replay(_ground_truth_predictions(ds, shift=(2, 30.0)), ds.categories)
    metrics = hrnetdet.evaluate(model, ann, images, progress=False)
    per_class = metrics["bbox"]["per_class"]
    assert per_class["circle"] == pytest.approx(1.0) and per_class["triangle"] == pytest.approx(1.0)
    assert per_class["square"] < 0.2
    assert metrics["bbox"]["stats"]["AP"] == pytest.approx(np.mean(list(per_class.values())))


def test_no_detections_scores_zero(shapes):
    ann, images = shapes
    ds = CocoDetection(ann, images)
    empty = [{"size": ds[i][0].shape[-2:], "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "scores": torch.zeros(0)} for i in range(len(ds))]
    metrics = hrnetdet.evaluate(Replay(empty, ds.categories), ann, images, progress=False)
    assert metrics["bbox"]["stats"]["AP"] == 0.0 and metrics["num_detections"] == 0


def test_class_count_mismatch_is_explained(shapes):
    ann, images = shapes
    model = Replay([], ["__background__", "a", "b"])
    with pytest.raises(ValueError, match="predicts 2 categories but .*val.json has 3: build it with num_classes=4"):
        hrnetdet.evaluate(model, ann, images, progress=False)


def test_confusion_matrix_and_pr_curves_written_as_json_and_png(shapes, tmp_path):
    ann, images = shapes
    ds = CocoDetection(ann, images)
    counts = np.bincount(torch.cat([ds[i][1]["labels"] for i in range(len(ds))]).numpy(), minlength=4)
    model = Replay(_ground_truth_predictions(ds, shift=(2, 30.0)), ds.categories)  # squares moved sideways
    hrnetdet.evaluate(model, ann, images, out_dir=str(tmp_path), progress=False)
    for name in ("confusion_matrix.png", "pr_curves_bbox.png"):
        assert (tmp_path / name).stat().st_size > 5000, name
    cm = json.load(open(tmp_path / "confusion_matrix.json"))
    assert cm["labels"] == ["background", "circle", "square", "triangle"]
    matrix = np.array(cm["matrix"])
    moved = matrix[2, 0]  # squares whose shifted box no longer overlaps enough: missed and false alarms
    assert matrix[1, 1] == counts[1] and matrix[3, 3] == counts[3] and moved >= 1
    assert matrix[2, 2] + moved == counts[2] and matrix[0, 2] == moved
    assert matrix[0, 0] == 0 and matrix[[1, 3], 0].sum() == 0 and matrix[0, [1, 3]].sum() == 0
    assert matrix.sum() - matrix[0, 2] == counts.sum()
    curves = json.load(open(tmp_path / "pr_curves_bbox.json"))
    assert len(curves["recall"]) == 101 and curves["recall"][-1] == 1.0
    for name in ("circle", "triangle"):  # every detection right: precision 1 up to recall 1
        assert curves["precision"][name]["0.50"] == [1.0] * 101
    square = curves["precision"]["square"]["0.50"]
    assert np.mean([p or 0.0 for p in square]) == pytest.approx(1 - moved / counts[2], abs=0.02)


def _imperfect_predictions(ds):
    """Ground truth with the boxes and masks of label 2 moved 4 pixels right and shuffled scores, so
    that AP and its size ranges are neither 0 nor 1."""
    torch.manual_seed(3)
    preds = _ground_truth_predictions(ds, shift=(2, 4.0))
    for p in preds:
        moved = p["labels"] == 2
        p["masks"][moved] = torch.roll(p["masks"][moved], 4, dims=-1)
        p["scores"] = torch.rand(len(p["scores"]))
    return preds


def _evaluate_replay(ds, ann, images, tmp_path=None, **kwargs):
    model = Replay(_imperfect_predictions(ds), ds.categories)
    return hrnetdet.evaluate(model, ann, images, iou_types=("bbox", "segm"), progress=False,
                             out_dir=None if tmp_path is None else str(tmp_path), **kwargs)


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_ap_equals_torchmetrics_where_conventions_agree(shapes, backend):
    """Same predictions, same ground truth (COCO's annotation areas): the 12 bbox numbers agree, and
    the segm numbers with segm_area="mask", torchmetrics' convention."""
    detection = pytest.importorskip("torchmetrics.detection")
    pytest.importorskip(backend)
    ann, images = shapes
    ds = CocoDetection(ann, images, with_masks=True)
    ours = _evaluate_replay(ds, ann, images, segm_area="mask")
    metric = detection.MeanAveragePrecision(iou_type=["bbox", "segm"], backend=backend)
    areas = {}
    for a in json.load(open(ann))["annotations"]:
        areas.setdefault(a["image_id"], []).append(float(a["area"]))
    for i, pred in enumerate(_imperfect_predictions(ds)):
        _, t = ds[i]
        metric.update([{"boxes": pred["boxes"], "labels": pred["labels"], "scores": pred["scores"],
                        "masks": pred["masks"][:, 0].bool()}],
                      [{"boxes": t["boxes"], "labels": t["labels"], "masks": t["masks"].bool(),
                        "area": torch.tensor(areas[int(t["image_id"])])}])
    theirs = metric.compute()
    names = {"AP": "map", "AP50": "map_50", "AP75": "map_75", "APs": "map_small", "APm": "map_medium",
             "APl": "map_large", "AR1": "mar_1", "AR10": "mar_10", "AR100": "mar_100", "ARs": "mar_small",
             "ARm": "mar_medium", "ARl": "mar_large"}
    assert 0.1 < ours["segm"]["stats"]["AP"] < 0.95
    for t in ("bbox", "segm"):
        for ours_name, their_name in names.items():
            assert ours[t]["stats"][ours_name] == pytest.approx(float(theirs[f"{t}_{their_name}"]), abs=1e-3), \
                (t, ours_name)


def test_segm_area_box_keeps_todays_numbers_and_mask_sorts_by_mask_area(tmp_path):
    """Circles and triangles of radius 16-18: box area above 32**2 (medium), mask area below (small)."""
    ann, images = make_shapes_dataset(str(tmp_path), "val", 4, seed=5, min_radius=16, max_radius=18)
    ds = CocoDetection(ann, images, with_masks=True)
    default = _evaluate_replay(ds, ann, images)
    assert _evaluate_replay(ds, ann, images, segm_area="box") == default
    results = coco_predictions(Replay(_imperfect_predictions(ds), ds.categories), ds, progress=False)
    for convention, area in (("box", lambda r: r["bbox"][2] * r["bbox"][3]),
                             ("mask", lambda r: float(mask_utils.area(r["segmentation"])))):
        _, evals = score(ds, results, ("segm",), convention)
        loaded = sorted(evals["segm"].cocoDt.anns.values(), key=lambda d: d["id"])
        assert [d["area"] for d in loaded] == pytest.approx([area(r) for r in results]), convention
    assert any(area < 32 ** 2 < r["bbox"][2] * r["bbox"][3]  # small by its mask, medium by its box
               for r in results for area in [mask_utils.area(r["segmentation"])])
    with pytest.raises(ValueError, match="segm_area must be one of"):
        _evaluate_replay(ds, ann, images, segm_area="polygon")


def test_predictions_json_holds_the_records_as_predicted(shapes, tmp_path):
    """pycocotools' loadRes adds id, iscrowd and area to the records it is given: it gets copies."""
    ann, images = shapes
    ds = CocoDetection(ann, images, with_masks=True)
    _evaluate_replay(ds, ann, images, tmp_path)
    results = json.load(open(tmp_path / "predictions.json"))
    assert results and all(set(r) == {"image_id", "category_id", "bbox", "score", "segmentation"} for r in results)
