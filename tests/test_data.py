"""COCO-format dataset: targets, masks, crowd/empty handling, clear errors for bad input, image
modes and EXIF orientation, augmentation presets and aspect-ratio grouped sampling."""
import json
import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from torchvision.ops import masks_to_boxes

from hrnetdet.data import (AUGMENTATIONS, Augment, BoxWarning, CocoDetection, DatasetError, GroupedBatchSampler, load_image,
                           make_shapes_dataset)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return make_shapes_dataset(str(tmp_path_factory.mktemp("shapes")), "train", 6, seed=3)


def _write(tmp_path, data, images=()):
    """An annotation file plus blank images of the given (file, width, height)."""
    for name, w, h in images:
        Image.new("RGB", (w, h), (10, 20, 30)).save(tmp_path / name)
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(data))
    return str(path), str(tmp_path)


def _coco(anns, images=({"id": 1, "file_name": "a.png", "width": 40, "height": 30},)):
    return {"images": list(images), "annotations": anns,
            "categories": [{"id": 5, "name": "cat"}, {"id": 2, "name": "dog"}]}


def test_targets_labels_boxes_and_masks(shapes):
    ann_file, image_dir = shapes
    data = json.load(open(ann_file))
    ds = CocoDetection(ann_file, image_dir, with_masks=True)
    assert ds.categories == ["__background__", "circle", "square", "triangle"]
    assert ds.cat_ids == [3, 7, 11]
    kinds = set()
    for i in range(len(ds)):
        image, target = ds[i]
        im = ds.images[i]
        assert image.shape == (3, im["height"], im["width"]) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        anns = [a for a in data["annotations"] if a["image_id"] == im["id"]]
        assert target["labels"].tolist() == [{3: 1, 7: 2, 11: 3}[a["category_id"]] for a in anns]
        x, y, w, h = np.array([a["bbox"] for a in anns]).T
        assert torch.equal(target["boxes"], torch.tensor(np.stack([x, y, x + w, y + h], 1), dtype=torch.float32))
        assert target["masks"].shape == (len(anns), im["height"], im["width"])
        for a, m in zip(anns, target["masks"]):
            kinds.add(type(a["segmentation"]).__name__)
            rle = mask_utils.encode(np.asfortranarray(m.numpy()))
            assert mask_utils.toBbox(rle).tolist() == a["bbox"] and int(m.sum()) == a["area"]
    assert kinds == {"dict", "list"}  # compressed RLE (circles) and polygons were both decoded


def test_uncompressed_rle_and_crowd_and_empty_images(tmp_path):
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[5:15, 10:30] = 1
    counts = []  # column-major run lengths starting with zeros
    flat, val, run = mask.flatten(order="F"), 0, 0
    for v in flat:
        if v != val:
            counts.append(run)
            val, run = v, 0
        run += 1
    counts.append(run)
    anns = [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [10, 5, 20, 10], "iscrowd": 0,
             "segmentation": {"size": [30, 40], "counts": counts}},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [0, 0, 40, 30], "iscrowd": 1,
             "segmentation": {"size": [30, 40], "counts": [0, 1200]}}]
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 2, "file_name": "b.png", "width": 40, "height": 30}]
    ann, root = _write(tmp_path, _coco(anns, images), [("a.png", 40, 30), ("b.png", 40, 30)])
    ds = CocoDetection(ann, root, with_masks=True)
    assert len(ds) == 2
    _, t = ds[0]
    assert t["labels"].tolist() == [1]  # 'dog' (id 2) is label 1; the crowd box is not a target
    assert torch.equal(t["masks"][0], torch.from_numpy(mask))
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 30, 40)
    assert len(CocoDetection(ann, root, filter_empty=True)) == 1
    assert len(CocoDetection(ann, root, min_image_size=32)) == 0


def test_missing_image_file_names_file_and_field(tmp_path):
    ann, root = _write(tmp_path, _coco([]))
    with pytest.raises(FileNotFoundError, match=r"a\.png.*images\[0\] file_name"):
        CocoDetection(ann, root)


def test_malformed_json_names_file_and_position(tmp_path):
    path = tmp_path / "ann.json"
    path.write_text('{"images": [\n  {"id": 1,}\n]}')
    with pytest.raises(DatasetError, match=r"ann\.json: malformed json at line 2, column 12"):
        CocoDetection(str(path), str(tmp_path))


def test_missing_field_is_named(tmp_path):
    ann, root = _write(tmp_path, _coco([{"id": 9, "image_id": 1, "category_id": 2}]), [("a.png", 40, 30)])
    with pytest.raises(DatasetError, match=r"annotations\[0\] lacks field\(s\) \['bbox'\]"):
        CocoDetection(ann, root)


def test_unknown_category_id_is_named(tmp_path):
    ann, root = _write(tmp_path, _coco([{"id": 9, "image_id": 1, "category_id": 4, "bbox": [1, 1, 5, 5]}]),
                       [("a.png", 40, 30)])
    with pytest.raises(DatasetError, match=r"annotations\[0\] \(id 9\): unknown category_id 4 \(categories: \[2, 5\]\)"):
        CocoDetection(ann, root)


def _box_warnings(make):
    """``make()``'s result and the messages of the BoxWarnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        made = make()
    return made, [str(w.message) for w in caught if issubclass(w.category, BoxWarning)]


def test_bad_boxes_clipped_or_dropped_with_one_counted_warning(tmp_path):
    boxes = [[-5, 2, 20, 10],    # clipped on the left
             [30, 20, 20, 20],   # clipped right and bottom
             [3, 3, 0, 8],       # zero width: dropped
             [50, 40, 5, 5],     # entirely outside: dropped
             [5, 5, 10, 10]]     # fine
    anns = [{"id": i + 1, "image_id": 1, "category_id": 5, "bbox": b} for i, b in enumerate(boxes)]
    ann, root = _write(tmp_path, _coco(anns), [("a.png", 40, 30)])
    ds, messages = _box_warnings(lambda: CocoDetection(ann, root))
    assert messages == [f"{ann}: dropped 2 annotation(s): 2 bbox under 1 pixel wide or high in its image (ids 3, 4); "
                        f"clipped 2 box(es) to their image (ids 1, 2)"]
    _, t = ds[0]
    assert t["boxes"].tolist() == [[0, 2, 15, 12], [30, 20, 40, 30], [5, 5, 15, 15]]


def test_duplicate_image_and_category_ids_are_refused_naming_them(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 40, "height": 30},
              {"id": 1, "file_name": "b.png", "width": 40, "height": 30}]
    ann, root = _write(tmp_path, _coco([{"id": 9, "image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5]}], images),
                       [("a.png", 40, 30), ("b.png", 40, 30)])
    with pytest.raises(DatasetError, match=rf"{ann}: duplicate image id\(s\) 1 in 'images'"):
        CocoDetection(ann, root)  # before: b.png silently got a.png's box
    data = _coco([{"id": 9, "image_id": 1, "category_id": 2, "bbox": [1, 1, 5, 5]}])
    data["categories"] = [{"id": 2, "name": "dog"}, {"id": 2, "name": "cat"}, {"id": 4, "name": "x"},
                          {"id": 4, "name": "y"}]
    ann, root = _write(tmp_path, data, [("a.png", 40, 30)])
    with pytest.raises(DatasetError, match=rf"{ann}: duplicate category id\(s\) 2, 4 in 'categories'"):
        CocoDetection(ann, root)  # before: "unknown category_id 2"


SQUARE = [5.0, 5.0, 15.0, 5.0, 15.0, 15.0, 5.0, 15.0]


def test_unusable_annotations_are_dropped_with_one_counted_warning_naming_them(tmp_path):
    crowd_rle = {"size": [10, 10], "counts": [100]}  # of a 10x10 image, not of this 40x30 one
    cases = [  # (bbox, segmentation, iscrowd)
        ([5, 5, 10, 10], [SQUARE], 0),                          # 1: fine
        ([float("nan"), 5, 10, 10], [SQUARE], 0),               # 2
        ([True, 5, 10, 10], [SQUARE], 0),                       # 3
        (["5", 5, 10, 10], [SQUARE], 0),                        # 4
        ([5, 5, 10], [SQUARE], 0),                              # 5
        ([5, 5, 10, 10], [[5.0, 5.0, 15.0, 15.0]], 0),          # 6: 2 points
        ([5, 5, 10, 10], [SQUARE[:-1]], 0),                     # 7: odd length
        ([0, 0, 10, 10], crowd_rle, 1),                         # 8
        ([5, 5, 10, 10], {"size": [30, 41], "counts": [1230]}, 0),  # 9
        ([5, float("inf"), 10, 10], [SQUARE], 0),               # 10
    ]
    anns = [{"id": i + 1, "image_id": 1, "category_id": 5, "bbox": b, "segmentation": s, "iscrowd": c}
            for i, (b, s, c) in enumerate(cases)]
    ann, root = _write(tmp_path, _coco(anns), [("a.png", 40, 30)])
    ds, messages = _box_warnings(lambda: CocoDetection(ann, root, with_masks=True))
    assert messages == [f"{ann}: dropped 9 annotation(s): 2 non-finite bbox (ids 2, 10), 2 non-numeric bbox "
                        f"(ids 3, 4), 1 bbox not [x, y, width, height] (id 5), 1 polygon with < 3 points (id 6), "
                        f"1 polygon of odd length (id 7), 2 RLE of the wrong size (ids 8, 9)"]
    _, t = ds[0]
    assert t["boxes"].tolist() == [[5, 5, 15, 15]] and int(t["masks"].sum()) == 100
    # without masks the segmentations are not read, so their problems drop nothing
    ds, messages = _box_warnings(lambda: CocoDetection(ann, root))
    assert len(ds[0][1]["boxes"]) == 4 and "(ids 8, 9)" not in messages[0]


def test_a_nan_box_is_dropped_the_same_under_every_augmentation(tmp_path):
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [5, 5, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 2, "bbox": [float("nan"), 5, 10, 10]}]
    ann, root = _write(tmp_path, _coco(anns), [("a.png", 40, 30)])
    for preset in AUGMENTATIONS:  # before: dropped under flip, a NaN target under none
        ds, messages = _box_warnings(lambda: CocoDetection(ann, root, transforms=Augment(preset, seed=0)))
        assert messages == [f"{ann}: dropped 1 annotation(s): 1 non-finite bbox (id 2)"], preset
        _, t = ds[0]
        assert t["labels"].tolist() == [2] and torch.isfinite(t["boxes"]).all(), preset


def test_size_mismatch_between_json_and_file(tmp_path):
    ann, root = _write(tmp_path, _coco([]), [("a.png", 30, 40)])
    with pytest.raises(DatasetError, match=r"40x30 \(width x height\) in the json but 30x40"):
        CocoDetection(ann, root)[0]


def test_image_modes_become_rgb(tmp_path):
    Image.new("L", (4, 3), 128).save(tmp_path / "gray.png")
    pal = Image.new("P", (4, 3), 1)
    pal.putpalette([0, 0, 0, 255, 128, 0] + [0] * 762)
    pal.save(tmp_path / "pal.png")
    Image.new("RGBA", (4, 3), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    Image.fromarray(np.full((3, 4), 32768, dtype=np.uint16)).save(tmp_path / "gray16.png")
    Image.new("CMYK", (4, 3), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    expected = {"gray.png": (128 / 255,) * 3, "pal.png": (1.0, 128 / 255, 0.0), "rgba.png": (10 / 255, 20 / 255, 30 / 255),
                "gray16.png": (32768 / 65535,) * 3, "cmyk.jpg": (1.0, 1.0, 1.0)}
    for name, rgb in expected.items():
        img = load_image(str(tmp_path / name))
        assert img.shape == (3, 3, 4) and img.dtype == torch.float32, name
        assert torch.allclose(img[:, 1, 1], torch.tensor(rgb), atol=1.5 / 255), (name, img[:, 1, 1])


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:10, :10] = 255  # a white block in the stored top-left corner
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    out = load_image(str(tmp_path / "rot.jpg"))
    assert out.shape == (3, 40, 20)
    assert out[:, :8, -8:].mean() > 0.9 and out[:, :8, :8].mean() < 0.1  # now top-right


def test_flip_preset_flips_boxes_masks_and_semantic_map_deterministically(shapes):
    ann_file, image_dir = shapes
    ds = CocoDetection(ann_file, image_dir, with_masks=True)
    image, target = ds[0]
    target["semantic_seg"] = torch.randint(0, 5, image.shape[-2:], dtype=torch.uint8)  # HTC's
    flip = Augment("flip", seed=1)
    rng = torch.get_rng_state()
    decisions = []
    for epoch in range(2):
        flip.set_epoch(epoch)
        decisions.append([not torch.equal(flip(image, target, i)[0], image) for i in range(40)])
    flip.set_epoch(0)
    assert decisions[0] == [not torch.equal(flip(image, target, i)[0], image) for i in range(40)]
    assert decisions[0] != decisions[1] and 10 < sum(decisions[0]) < 30
    assert torch.equal(torch.get_rng_state(), rng)  # the training RNG stream is untouched
    fi, ft = flip(image, target, decisions[0].index(True))
    w = image.shape[-1]
    assert torch.equal(fi, image.flip(-1)) and torch.equal(ft["masks"], target["masks"].flip(-1))
    assert torch.equal(ft["semantic_seg"], target["semantic_seg"].flip(-1))
    b = target["boxes"]
    assert torch.equal(ft["boxes"], torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], 1))
    assert torch.equal(ft["labels"], target["labels"]) and type(fi) is torch.Tensor


@pytest.mark.parametrize("preset", ["photometric", "scale-jitter"])
def test_presets_keep_boxes_on_their_masks(shapes, preset):
    ann_file, image_dir = shapes
    ds = CocoDetection(ann_file, image_dir, with_masks=True)
    aug = Augment(preset, seed=3)
    changed = 0
    for index in range(len(ds)):
        image, target = ds[index]
        out, t = aug(image, target, index)
        again, _ = aug(image, target, index)
        assert torch.equal(out, again) and out.shape == image.shape
        changed += not torch.equal(out, image)
        assert len(t["boxes"]) == len(t["labels"]) == len(t["masks"])
        assert set(t["labels"].tolist()) <= set(target["labels"].tolist())
        nonempty = (t["masks"].flatten(1) > 0).any(1)
        # each box is its (resized, cropped) mask's extent, as torchvision's masks_to_boxes measures it
        torch.testing.assert_close(t["boxes"][nonempty], masks_to_boxes(t["masks"][nonempty]) + torch.tensor(
            [0.0, 0.0, 1.0, 1.0]), rtol=0, atol=3.0 if preset == "scale-jitter" else 1.0)
    assert changed == len(ds)


def test_grouped_sampler_groups_ranks_and_resume():
    ratios = [1.25, 0.8, 1.25, 1.0, 0.8, 1.25, 1.25, 0.8, 1.0, 1.5, 0.5]
    per_rank = []
    for rank in range(2):
        s = GroupedBatchSampler(ratios, 2, seed=4, rank=rank, world_size=2)
        s.set_epoch(3)
        batches = list(s)
        assert len(batches) == len(s) == 4  # 5 landscape and 6 portrait images, each padded to 8 = 2 x (2 ranks x 2)
        for b in batches:
            assert len(b) == 2 and len({ratios[i] > 1 for i in b}) == 1
        per_rank.append(batches)
    assert set(sum(sum(per_rank, []), [])) == set(range(len(ratios)))
    s = GroupedBatchSampler(ratios, 2, seed=4, rank=1, world_size=2)
    s.set_epoch(3, start_batch=2)
    assert list(s) == per_rank[1][2:]
    s.set_epoch(4)
    assert list(s) != per_rank[1]
