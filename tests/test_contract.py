"""torchvision's detection contract, for every family: our versions of torchvision's generic
detection checks (empty targets, mixed sizes, zero detections, backprop to the input, scripting)
on small W18 models with random weights, and the types torchvision's models have."""
import pytest
import torch
import torch.nn.functional as F

import hrnetdet
from hrnetdet.detectors import has_masks
from hrnetdet.detectors.transform import cv2_linear_resize
from hrnetdet.zoo.checkpoint import save_pretrained

FAMILIES = ("faster_rcnn", "mask_rcnn", "cascade_rcnn", "cascade_mask_rcnn", "htc", "fcos")
TINY = dict(min_size=64, max_size=96, detections_per_img=5)
RPN_TINY = dict(rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=50,
                rpn_post_nms_top_n_test=20, box_batch_size_per_image=32)
SIZES = ((80, 100), (96, 72))  # mixed sizes; both resized (min_size 64)

_MODELS = {}


def tiny_model(family):
    """One W18 model per family for this module (building one is slow), in eval mode, grads cleared."""
    if family not in _MODELS:
        torch.manual_seed(0)
        extra = {} if family == "fcos" else RPN_TINY
        _MODELS[family] = hrnetdet.create_model(f"{family}_hrnetv2p_w18", **TINY, **extra)
    model = _MODELS[family].eval()
    model.zero_grad(set_to_none=True)
    return model


def targets_for(family, sizes, empty=False):
    """One target per image size: a box (or none) with the masks and semantic map the family trains on."""
    targets = []
    for h, w in sizes:
        n = 0 if empty else 1
        t = {"boxes": torch.tensor([[10.0, 12, 50, 60]][:n]).reshape(n, 4),
             "labels": torch.tensor([3][:n], dtype=torch.int64)}
        if family in ("mask_rcnn", "cascade_mask_rcnn", "htc"):
            masks = torch.zeros(n, h, w, dtype=torch.uint8)
            masks[:, 12:60, 10:50] = 1
            t["masks"] = masks
        if family == "htc":
            t["semantic_seg"] = torch.zeros(h, w, dtype=torch.uint8)
        targets.append(t)
    return targets


def images(requires_grad=False):
    torch.manual_seed(1)
    return [torch.rand(3, h, w).requires_grad_(requires_grad) for h, w in SIZES]


@pytest.mark.parametrize("family", FAMILIES)
def test_empty_targets_train_with_finite_losses(family):
    model = tiny_model(family).train()
    losses = model(images(), targets_for(family, SIZES, empty=True))
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_sizes_in_one_batch(family):
    model = tiny_model(family)
    with torch.no_grad(), hrnetdet.temporary_settings(model, score_thresh=0.0):
        out = model(images())
    assert len(out) == len(SIZES)
    for det, (h, w) in zip(out, SIZES):
        assert det["boxes"].shape[0] > 0
        assert (det["boxes"][:, 2] <= w + 1e-3).all() and (det["boxes"][:, 3] <= h + 1e-3).all()
        if has_masks(model):
            assert det["masks"].shape[-2:] == (h, w)
    losses = model.train()(images(), targets_for(family, SIZES))
    assert all(torch.isfinite(v) for v in losses.values()), losses


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_detections_are_empty_tensors_of_the_right_types(family):
    model = tiny_model(family)
    with torch.no_grad(), hrnetdet.temporary_settings(model, score_thresh=1.0):
        out = model(images())
    for det, (h, w) in zip(out, SIZES):
        assert (det["boxes"].shape, det["boxes"].dtype) == ((0, 4), torch.float32)
        assert (det["labels"].shape, det["labels"].dtype) == ((0,), torch.int64)
        assert (det["scores"].shape, det["scores"].dtype) == ((0,), torch.float32)
        if has_masks(model):
            assert (det["masks"].shape, det["masks"].dtype) == ((0, 1, h, w), torch.float32)
        else:
            assert "masks" not in det


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_the_input(family):
    model = tiny_model(family).train()
    xs = images(requires_grad=True)
    losses = model(xs, targets_for(family, SIZES))
    sum(losses.values()).backward()
    for x in xs:
        assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_resize_is_exact_unless_the_image_requires_grad(rocket):
    """The default path stays the reference's 8-bit resize bit for bit; an image that requires grad
    is interpolated in float on the same grid, within a few grey levels of it."""
    transform = tiny_model("faster_rcnn").transform
    exact = cv2_linear_resize(rocket, 64, 96)
    assert torch.equal(transform.resize_image(rocket, 64, 96), exact)
    with torch.no_grad():  # requires grad, but no graph is being recorded
        assert torch.equal(transform.resize_image(rocket.clone().requires_grad_(True), 64, 96), exact)
    smooth = transform.resize_image(rocket.clone().requires_grad_(True), 64, 96)
    assert smooth.requires_grad
    torch.testing.assert_close(smooth, F.interpolate(rocket[None], size=[64, 96], mode="bilinear")[0])
    assert (smooth - exact).abs().max() * 255 < 4


# Scripting the cascades and mask models takes 15-40 s each on a loaded machine; test_export scripts
# every family by default.
SCRIPT_FAMILIES = [pytest.param(f, marks=pytest.mark.slow) if f not in ("faster_rcnn", "fcos") else f
                   for f in FAMILIES]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("family", SCRIPT_FAMILIES)
def test_torchscript_returns_losses_and_detections(family):
    """torchvision's scripted detectors return (losses, detections) in eval mode."""
    model = tiny_model(family)
    with torch.no_grad(), hrnetdet.temporary_settings(model, score_thresh=0.0):
        ref = model(images())
        scripted = torch.jit.script(model)  # attributes are copied: scripted at threshold 0.0
        out = scripted(images())
    assert isinstance(out, tuple) and len(out) == 2
    losses, detections = out
    assert losses == {} and isinstance(detections, list) and len(detections) == len(SIZES)
    for got, want in zip(detections, ref):
        assert set(got) == set(want)
        torch.testing.assert_close(got["boxes"], want["boxes"])
    assert scripted([]) == ({}, [])


def test_min_size_is_a_tuple_after_building_loading_and_settings(tmp_path):
    model = tiny_model("fcos")
    assert model.transform.min_size == (64,)
    save_pretrained(model, str(tmp_path))
    loaded = hrnetdet.create_model(str(tmp_path))
    assert loaded.transform.min_size == (64,) and isinstance(loaded.transform.min_size, tuple)
    hrnetdet.set_settings(loaded, min_size=[72, 80])
    assert loaded.transform.min_size == (72, 80) and isinstance(loaded.transform.min_size, tuple)
