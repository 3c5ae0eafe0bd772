"""COCO-format detection datasets (an instances json plus an image folder) in torchvision's
target format, read and validated the way the reference's ``CocoDataset`` does (see
docs/NUMERICS.md, 'Dataset rules').

Targets are in original-image coordinates: the model's own transform resizes and normalises.
"""
import json
import math
import os
import warnings
from collections import Counter, defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import Tensor

from .categories import BACKGROUND
from .images import load_image

Target = Dict[str, Tensor]


class DatasetError(ValueError):
    """An annotation file or image that cannot be used; the message names the file and field."""


class BoxWarning(UserWarning):
    """Annotations were dropped (unusable box or segmentation) or their boxes clipped to their
    image: one warning per dataset, counting each reason and naming the annotation ids."""


def read_annotations(ann_file: str) -> Dict[str, Any]:
    """Load an instances json, checking the fields hrnetdet relies on."""
    ann_file = os.fspath(ann_file)
    if not os.path.isfile(ann_file):
        raise FileNotFoundError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{ann_file}: malformed json at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, dict):
        raise DatasetError(f"{ann_file}: top level is a {type(data).__name__}, not a COCO dict")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{ann_file}: missing or non-list field '{key}'")
    data.setdefault("annotations", [])
    for field_name, required in (("images", ("id", "file_name")), ("categories", ("id", "name")),
                                 ("annotations", ("id", "image_id", "category_id", "bbox"))):
        for i, rec in enumerate(data[field_name]):
            missing = [k for k in required if not isinstance(rec, dict) or k not in rec]
            if missing:
                raise DatasetError(f"{ann_file}: {field_name}[{i}] lacks field(s) {missing}")
    for field_name, noun in (("images", "image"), ("categories", "category")):
        counts = Counter(str(rec["id"]) for rec in data[field_name])
        repeated = [i for i, n in counts.items() if n > 1]
        if repeated:  # the later record's annotations would silently go to the earlier one
            raise DatasetError(f"{ann_file}: duplicate {noun} id(s) {', '.join(repeated[:10])} in '{field_name}': "
                               f"each id must be unique")
    return data


def categories_of(data: Dict[str, Any]) -> Tuple[List[int], List[str]]:
    """Category ids sorted ascending (the reference's label order) and the names, background first."""
    cats = sorted(data["categories"], key=lambda c: c["id"])
    return [int(c["id"]) for c in cats], [BACKGROUND] + [str(c["name"]) for c in cats]


def _is_number(value: Any) -> bool:
    """A finite int or float (json's true/false are ints to Python, but no coordinate)."""
    return type(value) in (int, float) and math.isfinite(value)


def bbox_problem(bbox: Any) -> Optional[str]:
    """Why ``bbox`` is no ``[x, y, width, height]`` of finite numbers, or None."""
    if not isinstance(bbox, list) or len(bbox) != 4:
        return "bbox not [x, y, width, height]"
    if not all(type(v) in (int, float) for v in bbox):
        return "non-numeric bbox"
    if not all(math.isfinite(v) for v in bbox):
        return "non-finite bbox"
    return None


def segmentation_problem(segm: Any, height: Optional[int], width: Optional[int]) -> Optional[str]:
    """Why ``segm`` cannot be an (H, W) mask of this image, or None: polygons need finite numbers
    and at least 3 (x, y) points each (else pycocotools rasterises nothing or reads past them),
    an RLE must have the image's size (else it is silently misplaced)."""
    if isinstance(segm, list):
        if not segm or not all(isinstance(p, list) and all(_is_number(v) for v in p) for p in segm):
            return "polygon not lists of finite numbers"
        if any(len(p) % 2 for p in segm):
            return "polygon of odd length"
        if any(len(p) < 6 for p in segm):
            return "polygon with < 3 points"
        return None
    if not (isinstance(segm, dict) and isinstance(segm.get("size"), list) and len(segm["size"]) == 2
            and all(type(v) is int for v in segm["size"]) and isinstance(segm.get("counts"), (list, str))):
        return "segmentation neither polygons nor RLE"
    counts = segm["counts"]
    if isinstance(counts, list) and not all(type(v) is int and v >= 0 for v in counts):
        return "RLE counts not whole numbers"
    h, w = segm["size"]
    if (height is not None and [h, w] != [height, width]) or (isinstance(counts, list) and sum(counts) != h * w):
        return "RLE of the wrong size"
    return None


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """Polygons, uncompressed or compressed RLE (checked by ``segmentation_problem``) -> an (H, W) uint8 mask."""
    if isinstance(segm, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segm, height, width))
    elif isinstance(segm["counts"], list):
        rle = mask_utils.frPyObjects(segm, height, width)
    else:
        rle = {"size": segm["size"], "counts": segm["counts"].encode("ascii")}
    return mask_utils.decode(rle)


class CocoDetection(torch.utils.data.Dataset):
    """A COCO-format detection dataset yielding ``(image, target)``.

    ``image`` is float RGB CHW in [0, 1]; ``target`` holds ``boxes`` (xyxy, original pixels),
    ``labels`` (1..K in ascending category-id order; 0 is the background), ``image_id`` and, with
    ``with_masks``, ``masks`` (N, H, W) uint8.

    Args:
        ann_file: the instances json.
        image_dir: the folder that ``file_name`` is relative to.
        transforms: ``callable(image, target, index) -> (image, target)`` (see ``data.transforms``).
        with_masks: decode polygon/RLE segmentations into ``masks``.
        filter_empty: drop images without annotations, as the reference does in training
            (``filter_empty_gt=True``); keep them (empty targets) for evaluation.
        min_image_size: drop images whose shorter side is smaller (the reference: 32 in training).

    Crowd annotations (``iscrowd=1``) are the reference's ignored boxes: not in the targets.
    Annotations are checked once, here, so that no augmentation can change what is trained on:
    a bbox that is not four finite numbers, or narrower or lower than one pixel after clipping to
    its image, and (``with_masks``) a polygon of under 3 points or odd length or an RLE of another
    size than its image are dropped; boxes reaching outside their image are clipped. One
    ``BoxWarning`` counts each reason and names the annotation ids. Duplicate image or category
    ids and references to unknown ones are a ``DatasetError``.
    """

    def __init__(self, ann_file: str, image_dir: str, *, transforms: Optional[Callable] = None,
                 with_masks: bool = False, filter_empty: bool = False, min_image_size: int = 0):
        self.ann_file = os.fspath(ann_file)
        self.image_dir = os.fspath(image_dir)
        self.transforms = transforms
        self.with_masks = with_masks
        data = read_annotations(self.ann_file)
        self.cat_ids, self.categories = categories_of(data)
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.cat_ids)}
        if not os.path.isdir(self.image_dir):
            raise FileNotFoundError(f"image folder not found: {self.image_dir}")

        by_image: Dict[int, List[dict]] = {int(im["id"]): [] for im in data["images"]}
        size_of = {int(im["id"]): (im.get("height"), im.get("width")) for im in data["images"]}
        dropped: Dict[str, List[Any]] = defaultdict(list)  # reason -> annotation ids
        for i, ann in enumerate(data["annotations"]):
            where = f"{self.ann_file}: annotations[{i}] (id {ann['id']})"
            if ann["category_id"] not in self.label_of:
                raise DatasetError(f"{where}: unknown category_id {ann['category_id']!r} "
                                   f"(categories: {self.cat_ids})")
            if ann["image_id"] not in by_image:
                raise DatasetError(f"{where}: unknown image_id {ann['image_id']!r}")
            if with_masks and not ann.get("iscrowd", 0) and "segmentation" not in ann:
                raise DatasetError(f"{where}: no 'segmentation' field (needed for masks)")
            problem = bbox_problem(ann["bbox"])
            if problem is None and with_masks and "segmentation" in ann:
                problem = segmentation_problem(ann["segmentation"], *size_of[ann["image_id"]])
            if problem is None:
                by_image[ann["image_id"]].append(ann)
            else:
                dropped[problem].append(ann["id"])

        self.images: List[dict] = []
        self.annotations: List[List[dict]] = []
        for i, im in enumerate(data["images"]):
            path = os.path.join(self.image_dir, im["file_name"])
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image file not found: {path} ({self.ann_file}: images[{i}] "
                                        f"file_name {im['file_name']!r})")
            anns = by_image[int(im["id"])]
            if filter_empty and not anns:
                continue
            if min(im.get("width", min_image_size), im.get("height", min_image_size)) < min_image_size:
                continue
            self.images.append(im)
            self.annotations.append(anns)
        self._boxes, clipped = self._prepare_boxes(dropped)
        if clipped or dropped:
            warnings.warn(annotation_summary(self.ann_file, dropped, clipped), BoxWarning, stacklevel=2)

    def _prepare_boxes(self, dropped: Dict[str, List[Any]]
                       ) -> Tuple[List[Tuple[np.ndarray, np.ndarray, List[int]]], List[Any]]:
        """Per image: xyxy boxes, labels and the kept annotations' indices, clipped and filtered;
        and the ids of the clipped ones (degenerate ones are added to ``dropped``)."""
        out, clipped = [], []
        for im, anns in zip(self.images, self.annotations):
            w, h = im.get("width"), im.get("height")
            boxes, labels, keep = [], [], []
            for j, ann in enumerate(anns):
                if ann.get("iscrowd", 0):
                    continue
                x, y, bw, bh = (float(v) for v in ann["bbox"])
                box = [x, y, x + bw, y + bh]
                if w is not None and h is not None:
                    c = [min(max(box[0], 0.0), w), min(max(box[1], 0.0), h),
                         min(max(box[2], 0.0), w), min(max(box[3], 0.0), h)]
                    if c != box and c[2] - c[0] >= 1 and c[3] - c[1] >= 1:
                        clipped.append(ann["id"])
                    box = c
                if box[2] - box[0] < 1 or box[3] - box[1] < 1:
                    dropped["bbox under 1 pixel wide or high in its image"].append(ann["id"])
                    continue
                boxes.append(box)
                labels.append(self.label_of[ann["category_id"]])
                keep.append(j)
            out.append((np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                        np.asarray(labels, dtype=np.int64), keep))
        return out, clipped

    def __len__(self) -> int:
        return len(self.images)

    def aspect_ratios(self) -> List[float]:
        """width / height of every image, from the json (no decoding)."""
        return [float(im.get("width", 1)) / float(im.get("height", 1)) for im in self.images]

    def image_path(self, index: int) -> str:
        return os.path.join(self.image_dir, self.images[index]["file_name"])

    def __getitem__(self, index: int) -> Tuple[Tensor, Target]:
        im = self.images[index]
        path = self.image_path(index)
        try:
            image = load_image(path)
        except ValueError as e:
            raise DatasetError(str(e)) from e
        h, w = image.shape[-2:]
        if (im.get("width", w), im.get("height", h)) != (w, h):
            raise DatasetError(f"{self.ann_file}: image id {im['id']} ({path}) is {im.get('width')}x"
                               f"{im.get('height')} (width x height) in the json but {w}x{h} when "
                               f"decoded with its EXIF orientation")
        boxes, labels, keep = self._boxes[index]
        target: Target = {"boxes": torch.from_numpy(boxes.copy()), "labels": torch.from_numpy(labels.copy()),
                          "image_id": torch.tensor(int(im["id"]))}
        if self.with_masks:
            anns = self.annotations[index]
            masks = np.zeros((len(keep), h, w), dtype=np.uint8)
            for k, j in enumerate(keep):
                try:
                    masks[k] = decode_segmentation(anns[j]["segmentation"], h, w)
                except Exception as e:
                    raise DatasetError(f"{self.ann_file}: annotation id {anns[j]['id']}: malformed "
                                       f"'segmentation': {e}") from e
            target["masks"] = torch.from_numpy(masks)
        if self.transforms is not None:
            image, target = self.transforms(image, target, index)
        return image, target


def annotation_summary(ann_file: str, dropped: Dict[str, List[Any]], clipped: List[Any]) -> str:
    """One line: how many annotations were dropped for each reason and clipped, with their first ids."""
    def ids(found: List[Any]) -> str:
        shown = ", ".join(str(i) for i in found[:5]) + (", ..." if len(found) > 5 else "")
        return f"(id{'s' if len(found) > 1 else ''} {shown})"
    parts = []
    if dropped:
        reasons = ", ".join(f"{len(found)} {reason} {ids(found)}" for reason, found in dropped.items())
        parts.append(f"dropped {sum(map(len, dropped.values()))} annotation(s): {reasons}")
    if clipped:
        parts.append(f"clipped {len(clipped)} box(es) to their image {ids(clipped)}")
    return f"{ann_file}: {'; '.join(parts)}"


def collate(batch: Sequence[Tuple[Tensor, Target]]) -> Tuple[List[Tensor], List[Target]]:
    """Lists of images and targets, as torchvision's detection models take them."""
    images, targets = zip(*batch)
    return list(images), list(targets)
