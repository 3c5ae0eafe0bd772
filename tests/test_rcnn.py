"""Faster / Mask R-CNN: the reference's numerics in each part, and torchvision's contract."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork

import hrnetdet
from hrnetdet.detectors.transform import reference_size
from hrnetdet.heads.anchors import ReferenceAnchorGenerator
from hrnetdet.heads.masks import paste_masks
from hrnetdet.heads.nms import batched_nms
from hrnetdet.heads.roi_align import map_roi_levels
from hrnetdet.zoo.records import arch_name

SMALL = dict(min_size=128, max_size=192, rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
             rpn_post_nms_top_n_train=200, box_batch_size_per_image=64)

# The reference's learnable parameters (docs/NUMERICS.md, 'Parameter counts'); torchvision's
# layout adds background rows: 4*1024+4 in the box regressor, and 256+1 in the mask logits.
REFERENCE_PARAMS = {
    "faster_rcnn": {18: 27_482_676, 32: 47_279_712, 40: 63_526_112},
    "mask_rcnn": {18: 30_125_956, 32: 49_922_992, 40: 66_169_392},
}
BACKGROUND_ROWS = {"faster_rcnn": 4 * 1024 + 4, "mask_rcnn": 4 * 1024 + 4 + 256 + 1}


@pytest.mark.parametrize("family", ["faster_rcnn", "mask_rcnn"])
@pytest.mark.parametrize("width", [18, 32, 40])
def test_parameter_counts_equal_reference(family, width):
    with torch.device("meta"):
        model = hrnetdet.create_model(arch_name(family, width))
    n = sum(p.numel() for p in model.parameters())
    assert n - BACKGROUND_ROWS[family] == REFERENCE_PARAMS[family][width]


def test_resize_rounding_is_the_reference():
    # 640x480 -> 1067x800 (torchvision's float32 floor gives 799; docs/NUMERICS.md, 'Resize rounding')
    assert reference_size(480, 640, 800, 1333) == (800, 1067)
    assert reference_size(427, 640, 800, 1333) == (800, 1199)
    assert reference_size(300, 1000, 800, 1333) == (400, 1333)
    model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18").eval()
    images, _ = model.transform([torch.rand(3, 480, 640)])
    assert images.image_sizes == [(800, 1067)]
    assert images.tensors.shape[-2:] == (800, 1088)


def test_anchors_are_unrounded_with_fixed_strides():
    gen = ReferenceAnchorGenerator()
    base = gen.cell_anchors[0]
    # ratio 0.5 at size 32: half-sizes (22.63, 11.31)
    torch.testing.assert_close(base[0], torch.tensor([-16 * math.sqrt(2), -8 * math.sqrt(2),
                                                      16 * math.sqrt(2), 8 * math.sqrt(2)]))
    feats = [torch.zeros(1, 1, 200 // 2 ** i, 304 // 2 ** i) for i in range(4)] + [torch.zeros(1, 1, 12, 19)]
    from torchvision.models.detection.image_list import ImageList
    anchors = gen(ImageList(torch.zeros(1, 3, 800, 1216), [(800, 1216)]), feats)[0]
    per_level = [3 * f.shape[-2] * f.shape[-1] for f in feats]
    last = anchors[-per_level[-1]:].view(12, 19, 3, 4)
    # the stride-64 level keeps stride 64 although 800 // 12 == 66
    torch.testing.assert_close(last[1, 2, 1], torch.tensor([128 - 256.0, 64 - 256.0, 128 + 256.0, 64 + 256.0]))


def test_roi_level_mapping_uses_finest_scale_56():
    boxes = torch.tensor([[0, 0, 111.9, 100], [0, 0, 112, 112], [0, 0, 223, 223], [0, 0, 224, 224],
                          [0, 0, 448, 448], [0, 0, 2000, 2000], [0, 0, 10, 10]])
    assert map_roi_levels(boxes, 4).tolist() == [0, 1, 1, 2, 3, 3, 0]


def random_boxes(n, size, generator):
    xy = torch.rand(n, 2, generator=generator) * size
    wh = torch.rand(n, 2, generator=generator) * size / 3 + 1
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("split_threshold", [10000, 1000])
def test_batched_nms_is_one_nms_of_class_shifted_boxes(split_threshold):
    """The reference's (mmcv's) class separation: torchvision's coordinate trick, which torchvision
    itself only uses for small inputs on the CPU, with one NMS and with the per-class split."""
    n = 3000
    g = torch.Generator().manual_seed(0)
    # clusters of 10 jittered copies, as a detector's near-duplicates
    boxes = random_boxes(n // 10, 1300.0, g).repeat_interleave(10, 0) + torch.randn(n, 4, generator=g) * 8
    scores = (torch.randperm(n, generator=g) + 1.0) / n  # no ties
    classes = torch.randint(0, 20, (n // 10,), generator=g).repeat_interleave(10)
    expected = torchvision.ops.boxes._batched_nms_coordinate_trick(boxes, scores, classes, 0.5)
    assert n / 10 < len(expected) < n / 2
    assert torch.equal(batched_nms(boxes, scores, classes, 0.5, split_threshold), expected)


def test_batched_nms_keeps_the_references_decision_at_the_threshold():
    """Two class-79 boxes with IoU 0.5000004: unshifted per-class NMS (torchvision above 4,000
    elements on the CPU) suppresses the second; the reference's 31,679 px class shift rounds it
    to just under 0.5 and keeps it."""
    x = 33.33330154418945
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [x, 0.0, 100.0 + x, 100.0], [0.0, 0.0, 400.0, 400.0]])
    scores, classes = torch.tensor([0.9, 0.8, 0.7]), torch.tensor([79, 79, 0])
    assert torchvision.ops.box_iou(boxes[:1].double(), boxes[1:2].double()).item() > 0.5
    assert torchvision.ops.boxes._batched_nms_vanilla(boxes, scores, classes, 0.5).tolist() == [0, 2]
    assert batched_nms(boxes, scores, classes, 0.5).tolist() == [0, 1, 2]


def test_box_postprocess_equals_torchvisions_away_from_ties():
    """The reference's multiclass NMS keeps torchvision's decode, clip, threshold and top-k; on
    random inputs (no near-threshold pairs, no sub-0.01 px boxes) the detections are the same."""
    heads = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18").roi_heads
    g = torch.Generator().manual_seed(0)
    proposals = [random_boxes(300, 250.0, g) + 50, random_boxes(200, 250.0, g) + 50]
    logits = torch.randn(500, 81, generator=g) * 3
    deltas = torch.randn(500, 81 * 4, generator=g) * 0.5
    shapes = [(480, 520), (500, 400)]
    ours = heads.postprocess_detections(logits, deltas, proposals, shapes)
    theirs = RoIHeads.postprocess_detections(heads, logits, deltas, proposals, shapes)
    assert [len(b) for b in ours[0]] == [100, 100]
    for a, b in zip(ours, theirs):  # boxes, scores, labels: a tensor per image
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_proposal_filter_equals_torchvisions_away_from_ties():
    rpn = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18", rpn_pre_nms_top_n_test=300).rpn.eval()
    g = torch.Generator().manual_seed(0)
    per_level = [4000, 1000, 250, 64, 16]
    proposals = torch.stack([random_boxes(sum(per_level), 700.0, g) - 50 for _ in range(2)])
    objectness = torch.randn(2 * sum(per_level), 1, generator=g)
    shapes = [(600, 640), (640, 500)]
    ours = rpn.filter_proposals(proposals, objectness, shapes, per_level)
    theirs = RegionProposalNetwork.filter_proposals(rpn, proposals, objectness, shapes, per_level)
    assert all(len(b) > 500 for b in ours[0])
    for a, b in zip(ours, theirs):  # boxes, scores: a tensor per image
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_mask_pasting_equals_full_image_grid_sample():
    """The per-box paste equals the reference's whole-image grid_sample path, thresholded."""
    masks = torch.rand(5, 1, 28, 28)
    boxes = torch.tensor([[10.3, 5.7, 60.2, 40.9], [0.0, 0.0, 99.5, 79.5], [50.5, 50.5, 51.0, 51.2],
                          [-5.0, 30.0, 20.0, 90.0], [70.0, 10.0, 130.0, 30.0]])
    h, w = 80, 100
    ys = (torch.arange(h, dtype=torch.float32) + 0.5)[None] - boxes[:, 1:2]
    xs = (torch.arange(w, dtype=torch.float32) + 0.5)[None] - boxes[:, 0:1]
    gy = ys / (boxes[:, 3:4] - boxes[:, 1:2]) * 2 - 1
    gx = xs / (boxes[:, 2:3] - boxes[:, 0:1]) * 2 - 1
    grid = torch.stack([gx[:, None, :].expand(5, h, w), gy[:, :, None].expand(5, h, w)], dim=3)
    full = F.grid_sample(masks, grid, align_corners=False)
    expected = (full >= 0.5).float()
    got = paste_masks(masks, boxes, h, w, threshold=0.5)
    assert got.shape == (5, 1, h, w)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert expected.sum() > 0


def _targets(with_masks: bool):
    boxes = torch.tensor([[20.0, 10.0, 120.0, 100.0], [100.0, 150.0, 200.0, 250.0]])
    t = {"boxes": boxes, "labels": torch.tensor([1, 5])}
    if with_masks:
        m = torch.zeros(2, 256, 256, dtype=torch.uint8)
        m[0, 10:100, 20:120] = 1
        m[1, 150:250, 100:200] = 1
        t["masks"] = m
    return t


@pytest.mark.parametrize("family", ["faster_rcnn", "mask_rcnn"])
def test_training_losses_finite_and_gradients_reach_every_part(family):
    with_masks = family == "mask_rcnn"
    model = hrnetdet.create_model(f"{family}_hrnetv2p_w18", **SMALL).train()
    images = [torch.rand(3, 256, 256), torch.rand(3, 200, 240)]
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    if with_masks:
        empty["masks"] = torch.zeros(0, 200, 240, dtype=torch.uint8)
    losses = model(images, [_targets(with_masks), empty])
    expected = {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert set(losses) == expected | ({"loss_mask"} if with_masks else set())
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    parts = ["backbone.body.conv1", "backbone.body.stage4.2.fuse_layers.0.3", "backbone.fpn.reduction_conv",
             "backbone.fpn.fpn_convs.0", "rpn.head.conv", "rpn.head.bbox_pred", "roi_heads.box_head.fc6",
             "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"]
    if with_masks:
        parts += ["roi_heads.mask_head.0", "roi_heads.mask_predictor.mask_fcn_logits"]
    grads = {n: p.grad for n, p in model.named_parameters()}
    for part in parts:
        g = [v for n, v in grads.items() if n.startswith(part) and v is not None]
        assert g and any(x.abs().sum() > 0 for x in g), f"no gradient reaches {part}"


@pytest.mark.parametrize("family", ["faster_rcnn", "mask_rcnn"])
def test_eval_contract(family):
    model = hrnetdet.create_model(f"{family}_hrnetv2p_w18", box_score_thresh=0.0, **SMALL).eval()
    sizes = [(150, 200), (97, 61)]
    with torch.no_grad():
        out = model([torch.rand(3, *s) for s in sizes])
    assert len(out) == 2
    for res, (h, w) in zip(out, sizes):
        n = res["boxes"].shape[0]
        assert 0 < n <= 100
        assert res["boxes"].dtype == torch.float32 and res["boxes"].shape == (n, 4)
        assert res["labels"].dtype == torch.int64 and res["labels"].min() >= 1 and res["labels"].max() <= 80
        assert (res["scores"][:-1] >= res["scores"][1:]).all()
        assert (res["boxes"][:, 0::2] <= w).all() and (res["boxes"][:, 1::2] <= h).all()
        if family == "mask_rcnn":
            assert res["masks"].shape == (n, 1, h, w)
            assert set(res["masks"].unique().tolist()) <= {0.0, 1.0}
        else:
            assert "masks" not in res


@pytest.mark.parametrize("family", ["faster_rcnn", "mask_rcnn"])
def test_eval_without_detections(family):
    model = hrnetdet.create_model(f"{family}_hrnetv2p_w18", box_score_thresh=1.0, **SMALL).eval()
    with torch.no_grad():
        res = model([torch.zeros(3, 64, 80)])[0]
    assert res["boxes"].shape == (0, 4) and res["labels"].shape == (0,) and res["scores"].shape == (0,)
    if family == "mask_rcnn":
        assert res["masks"].shape == (0, 1, 64, 80)


def test_categories_and_num_classes():
    model = hrnetdet.create_model("faster_rcnn_hrnetv2p_w18")
    assert len(model.categories) == 81 and model.categories[0] == "__background__"
    assert model.categories[1] == "person"
    custom = hrnetdet.create_model("mask_rcnn_hrnetv2p_w18", num_classes=4, categories=["a", "b", "c"])
    assert custom.categories == ["__background__", "a", "b", "c"]
    assert custom.roi_heads.box_predictor.cls_score.out_features == 4
    assert custom.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    with pytest.raises(ValueError, match="categories"):
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w18", num_classes=3, categories=["a"])


def test_registry_names_and_tags():
    from hrnetdet import faster_rcnn_hrnetv2p_w32, mask_rcnn_hrnetv2p_w18  # noqa: F401
    names = hrnetdet.list_models("*rcnn_hrnetv2p_w*")
    for fam in ("faster_rcnn", "mask_rcnn"):
        for w in (18, 32, 40, 48):
            assert f"{fam}_hrnetv2p_w{w}" in names
    assert "faster_rcnn_hrnetv2p_w32.coco_2x" in hrnetdet.list_models(pretrained=True)
    cfg = hrnetdet.get_pretrained_cfg("faster_rcnn_hrnetv2p_w32.coco_1x")
    assert cfg.reference_url.endswith("faster_rcnn_hrnetv2p_w32_1x_coco/faster_rcnn_hrnetv2p_w32_1x_coco_20200130-6e286425.pth")
    assert cfg.reference_sha256_prefix == "6e286425"
    assert hrnetdet.get_pretrained_cfg("faster_rcnn_hrnetv2p_w32").tag == "coco_2x"
    assert hrnetdet.get_pretrained_cfg("faster_rcnn_hrnetv2p_w48") is None
    with pytest.raises(ValueError, match="no weight tag 'coco_9x'"):
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w32.coco_9x")
    with pytest.raises(ValueError, match="unknown model"):
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w99")
    with pytest.raises(ValueError, match="no published weights"):
        hrnetdet.create_model("faster_rcnn_hrnetv2p_w48", pretrained=True)
