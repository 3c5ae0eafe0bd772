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
from hrnetdet.engine.evaluate import STAT_NAMES, format_table


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
