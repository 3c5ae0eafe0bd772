"""SAHI through hrnetdet.integrations.sahi: the model's names and dataset ids, tiles at the slice
size (boxes as hrnetdet's own sliced predict gives them), masks, and the model left as it was."""
import importlib
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sahi")
from sahi.predict import get_sliced_prediction  # noqa: E402

import hrnetdet  # noqa: E402
from hrnetdet.integrations.sahi import detection_model  # noqa: E402
from hrnetdet.inference import load_image  # noqa: E402

SLICE = 96
SMALL = dict(min_size=64, max_size=64, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
             num_classes=4, categories=["ant", "bee", "cat"], category_ids=[5, 7, 9])


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    return np.kron(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), np.ones((12, 12, 1), dtype=np.uint8))  # 96x96


def calibrated(arch, image):
    """A small W18 model, test scale 64 (not the slice size), calibrated to score every box."""
    from calibrate import calibrate
    torch.manual_seed(0)
    return calibrate(hrnetdet.create_model(arch, **SMALL), [load_image(image[:64, :64])])


@pytest.fixture(scope="module")
def faster(image):
    return calibrated("faster_rcnn_hrnetv2p_w18", image)


@pytest.fixture(scope="module")
def mask(image):
    return calibrated("mask_rcnn_hrnetv2p_w18", image)


def sliced(model, image, **kwargs):
    helper = detection_model(model, slice_size=SLICE, confidence_threshold=0.0, **kwargs)
    result = get_sliced_prediction(image, helper, slice_height=SLICE, slice_width=SLICE,
                                   overlap_height_ratio=0.2, overlap_width_ratio=0.2, perform_standard_pred=False,
                                   postprocess_type="NMS", postprocess_match_metric="IOU",
                                   postprocess_match_threshold=0.5, verbose=0)
    return result.object_prediction_list


def test_names_and_ids_are_the_models(faster, image):
    found = sliced(faster, image)
    assert len(found) > 10
    assert {(p.category.id, p.category.name) for p in found} <= {(5, "ant"), (7, "bee"), (9, "cat")}


def test_one_tile_boxes_equal_hrnetdets_sliced_predict(faster, image):
    """One tile: SAHI's boxes, scores and ids are hrnetdet's own (tiles at scale 1, not at the
    model's test scale 64)."""
    found = sorted(sliced(faster, image), key=lambda p: -p.score.value)
    ours = hrnetdet.predict(faster, image, slice=SLICE, score_thresh=0.0)
    assert len(found) == len(ours["boxes"]) > 10
    theirs = torch.tensor([p.bbox.to_xyxy() for p in found])
    assert torch.allclose(theirs, ours["boxes"].float(), atol=1e-3, rtol=0)
    assert torch.allclose(torch.tensor([p.score.value for p in found]), ours["scores"], atol=1e-6, rtol=0)
    ids = torch.tensor([None, 5, 7, 9][1:])[ours["labels"] - 1]
    assert [p.category.id for p in found] == ids.tolist()


def test_model_left_as_it_was(faster, image):
    faster.train()
    settings, min_size, max_size = faster.settings, faster.transform.min_size, faster.transform.max_size
    modes = [m.training for m in faster.modules()]
    try:
        sliced(faster, np.ascontiguousarray(np.tile(image, (2, 2, 1))))  # tiles and SAHI's whole-image pass
    finally:
        after = [m.training for m in faster.modules()]
        faster.eval()
    assert faster.settings == settings and faster.settings.min_size == (64,)
    assert (faster.transform.min_size, faster.transform.max_size) == (min_size, max_size) == ((64,), 64)
    assert faster.roi_heads.score_thresh == 0.0
    assert after == modes


def test_mask_model_gives_masks(mask, image):
    found = sliced(mask, image)
    assert len(found) > 10
    with_masks = [p for p in found if p.mask is not None]
    assert with_masks and with_masks[0].mask.bool_mask.shape == image.shape[:2]
    assert any(p.mask.bool_mask.any() for p in with_masks)


def test_empty_masks_are_kept_as_boxes(mask, image):
    """No mask pixel passes threshold 1: SAHI's own wrapper stops ("Invalid segmentation mask");
    here each detection stays, with its box and no mask."""
    found = sliced(mask, image, mask_threshold=1.0)
    assert len(found) > 10 and all(p.mask is None for p in found)


def test_image_size_is_refused(faster):
    with pytest.raises(TypeError, match="image_size is not used"):
        detection_model(faster, slice_size=SLICE, image_size=SLICE)


def test_missing_sahi_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sahi.models.torchvision", None)
    monkeypatch.delitem(sys.modules, "hrnetdet.integrations.sahi")
    with pytest.raises(ImportError, match=r'pip install "hrnetdet\[sahi\]"'):
        importlib.import_module("hrnetdet.integrations.sahi")
