"""FCOS: the reference's layout and parameter counts, its training rules, both test-time rules and
the BGR-to-RGB conversion of its checkpoints."""
import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from hrnetdet.detectors.fcos import FCOSDetector, build_fcos
from hrnetdet.detectors.rcnn import IMAGENET_MEAN, IMAGENET_STD, build_transform, hrnetv2p_backbone
from hrnetdet.detectors.settings import FCOSSettings
from hrnetdet.heads.fcos import FCOSHead, fcos_points
from hrnetdet.zoo import create_model
from hrnetdet.zoo.checkpoint import load_into
from hrnetdet.zoo.convert import convert_reference, identify_reference
from hrnetdet.zoo.registry import get_family, list_families
from reference_layout import reference_checkpoint

APPENDIX = Path(__file__).parent / "data" / "mmdet_hrnet_keys_appendix.txt"
TINY = dict(min_size=96, max_size=128)


def _appendix_section(title: str):
    """(key, shape) rows of one section of the key listing."""
    rows, inside = [], False
    for line in APPENDIX.read_text().splitlines():
        if line.startswith("## "):
            inside = line[3:].startswith(title)
            continue
        m = re.fullmatch(r"(\S+) \[([\d, ]*)\]", line)
        if inside and m:
            rows.append((m.group(1), tuple(int(d) for d in m.group(2).split(",") if d.strip())))
    return rows


@pytest.mark.parametrize("width,count", [(18, 17_500_654), (32, 37_297_690), (40, 53_544_090)])
def test_parameter_counts_match_reference(width, count):
    with torch.device("meta"):
        model = build_fcos(width)
    assert sum(p.numel() for p in model.parameters()) == count
    assert len(model.state_dict()) == 1877


def test_appendix_key_listing_converts_and_loads_strictly():
    backbone = [r for r in _appendix_section("1. Full key list") if r[0].startswith("backbone.")]
    neck = _appendix_section("Neck keys per width")[12:24]          # the W32 block
    head = _appendix_section("Head keys (non-backbone, non-neck) for family=fcos")
    assert len(backbone) == 1830 and neck[0] == ("neck.reduction_conv.conv.weight", (256, 480, 1, 1))
    assert len(head) == 35
    sd = {k: torch.empty(s, device="meta") for k, s in backbone + neck + head}
    family, width = identify_reference(sd, "appendix", list_families())
    assert (family.name, width) == ("fcos", 32)
    assert family.reference.num_classes(sd) == 81
    with torch.device("meta"):
        model = build_fcos(32)
    load_into(model, convert_reference(sd, family), "appendix", "fcos_hrnetv2p_w32")


def test_losses_are_finite_and_reach_every_part():
    # Regress ranges scaled by 1/16 so that a 96x96 image has positives on all five levels.
    small_ranges = ((-1, 4), (4, 8), (8, 16), (16, 32), (32, 1e8))
    model = FCOSDetector(hrnetv2p_backbone(18, fpn_stride=2), FCOSHead(256, 80, regress_ranges=small_ranges),
                         build_transform(FCOSSettings(**TINY), None)).train()
    # one box per level: L0 point (20, 76), L1 (72, 88), L2 (80, 48), L3 (32, 32), L4 (64, 64)
    boxes = torch.tensor([[17., 73., 23., 79.], [67., 83., 77., 93.], [70., 40., 92., 62.],
                          [10., 10., 50., 50.], [2., 2., 94., 94.]])
    targets = [{"boxes": boxes, "labels": torch.tensor([1, 5, 17, 80, 3])}]
    losses = model([torch.rand(3, 96, 96)], targets)
    assert set(losses) == {"loss_classification", "loss_bbox_regression", "loss_bbox_ctrness"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    params = dict(model.named_parameters())
    for name in ["backbone.body.conv1.weight", "backbone.body.stage4.2.fuse_layers.3.0.0.0.weight",
                 "backbone.fpn.reduction_conv.weight", "backbone.fpn.fpn_convs.4.weight",
                 "head.cls_convs.0.conv.weight", "head.cls_convs.3.gn.weight",
                 "head.reg_convs.0.conv.weight", "head.reg_convs.3.gn.bias",
                 "head.conv_cls.weight", "head.conv_reg.bias", "head.conv_centerness.weight",
                 *[f"head.scales.{i}.scale" for i in range(5)]]:
        grad = params[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_images_without_boxes_train_on_background_only():
    head = FCOSHead(32, 80, num_groups=8)
    torch.nn.init.zeros_(head.conv_cls.weight)     # every logit is the prior's bias
    features = [torch.randn(2, 32, h, w) for h, w in [(8, 12), (4, 6), (2, 3), (1, 2), (1, 1)]]
    cls, dist, ctr = head(features)
    points = fcos_points([f.shape[-2:] for f in features], head.strides, torch.float32, torch.device("cpu"))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = head.compute_loss([empty, empty], cls, dist, ctr, points)
    assert losses["loss_bbox_regression"] == 0 and losses["loss_bbox_ctrness"] == 0
    # All 2 x 129 x 80 logits are negatives at the 1% prior; the normaliser is max(num_pos, 1).
    p = 0.01
    per_logit = -(1 - 0.25) * p ** 2 * math.log(1 - p)
    assert losses["loss_classification"].item() == pytest.approx(2 * 129 * 80 * per_logit, rel=1e-5)
    sum(losses.values()).backward()
    assert head.conv_cls.bias.grad.abs().sum() > 0
    assert head.conv_reg.weight.grad.abs().sum() == 0


def test_assignment_takes_smallest_box_within_the_range():
    head = FCOSHead(256, 80)
    points = torch.tensor([[30., 30.], [100., 100.], [30., 30.], [300., 10.]])
    ranges = torch.tensor([[-1., 64.], [-1., 64.], [64., 128.], [-1., 64.]])
    boxes = torch.tensor([[0., 0., 120., 120.], [20., 20., 50., 60.]])
    labels, dist = head.assign_targets(points, ranges, boxes, torch.tensor([4, 9]))
    # point 0: inside both, the small one is in range; point 1: only the big box, max distance
    # 100 > 64; point 2: the big box is in the 64..128 range; point 3: inside nothing.
    assert labels.tolist() == [9, 0, 4, 0]
    torch.testing.assert_close(dist[0], torch.tensor([10., 10., 20., 30.]))
    torch.testing.assert_close(dist[2], torch.tensor([30., 30., 90., 90.]))


def test_points_are_cell_centres_on_fixed_strides():
    pts = fcos_points([(2, 3), (1, 1)], [8, 128], torch.float32, torch.device("cpu"))
    torch.testing.assert_close(pts[0], torch.tensor([[4., 4.], [12., 4.], [20., 4.], [4., 12.], [12., 12.], [20., 12.]]))
    torch.testing.assert_close(pts[1], torch.tensor([[64., 64.]]))


def _logit(p):
    return math.log(p / (1 - p))


@pytest.mark.parametrize("version,topk,expected", [
    # top-2 locations by max(cls*ctr): 0 and 2 (0.45 each); location 1 is below 0.05 after ctr.
    ("v2", 2, [(1, 0.45), (1, 0.45), (2, 0.4)]),
    ("v2", 1000, [(1, 0.45), (1, 0.45), (2, 0.4)]),
    # top-2 (location, class) pairs with cls > 0.05: (0, 0) and (0, 1), then times ctr.
    ("v3", 2, [(1, 0.45), (2, 0.4)]),
    # without the top-k cut, location 1 (cls 0.06 > 0.05) stays with score 0.06 * 0.5.
    ("v3", 1000, [(1, 0.03), (1, 0.45), (1, 0.45), (2, 0.4)]),
])
def test_postprocess_versions(version, topk, expected):
    """v2 thresholds cls*ctr and ranks locations; v3 thresholds cls alone, ranks (location, class)
    pairs and multiplies by ctr afterwards."""
    head = FCOSHead(256, 3, strides=(8,), regress_ranges=((-1, 1e8),), topk_candidates=topk,
                    postprocess=version)
    # 3 far-apart locations; cls probabilities (K=3) and centerness:
    cls = torch.tensor([[0.9, 0.8, 0.0], [0.06, 0.0, 0.0], [0.5, 0.0, 0.0]])
    ctr = torch.tensor([0.5, 0.5, 0.9])
    logits = [cls.clamp(1e-6, 1 - 1e-6).logit()[None]]
    ctr_logits = [ctr.logit()[None]]
    dist = [torch.full((1, 3, 4), 2.0)]
    points = [torch.tensor([[10., 10.], [50., 50.], [90., 90.]])]
    det = head.postprocess_detections(logits, dist, ctr_logits, points, [(100, 100)])[0]
    got = sorted(zip(det["labels"].tolist(), [round(s, 4) for s in det["scores"].tolist()]))
    assert got == expected
    torch.testing.assert_close(det["boxes"][det["labels"] == 2], torch.tensor([[8., 8., 12., 12.]]))
    assert det["scores"].tolist() == sorted(det["scores"].tolist(), reverse=True)


def test_eval_contract():
    model = create_model("fcos_hrnetv2p_w18", score_thresh=0.001, detections_per_img=50, **TINY).eval()
    assert len(model.categories) == 81 and model.categories[1] == "person"
    images = [torch.rand(3, 60, 100), torch.rand(3, 130, 90)]
    with torch.no_grad():
        out = model(images)
    assert len(out) == 2
    for det, img in zip(out, images):
        assert set(det) == {"boxes", "labels", "scores"}
        n = det["boxes"].shape[0]
        assert 0 < n <= 50 and det["labels"].shape == det["scores"].shape == (n,)
        assert det["labels"].min() >= 1 and det["labels"].max() <= 80
        assert (det["scores"][:-1] >= det["scores"][1:]).all()
        h, w = img.shape[-2:]
        b = det["boxes"]
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()


def test_bgr_checkpoint_converts_to_rgb_input(tmp_path):
    """The reference's model (its weights as they are) on a BGR picture with BGR mean/std == the
    converted model on the RGB picture."""
    ckpt = reference_checkpoint("fcos")
    torch.nn.init.normal_(ckpt["state_dict"]["bbox_head.conv_cls.weight"], std=0.05)  # spread the scores
    path = tmp_path / "fcos_w32.pth"
    torch.save(ckpt, path)
    fcos = get_family("fcos_hrnetv2p_w32")[0]
    as_trained = dataclasses.replace(fcos, reference=dataclasses.replace(fcos.reference, bgr_input=False))
    reference = build_fcos(32, score_thresh=0.02, **TINY, image_mean=IMAGENET_MEAN[::-1],
                           image_std=IMAGENET_STD[::-1]).eval()
    load_into(reference, convert_reference(ckpt["state_dict"], as_trained), str(path), "fcos_hrnetv2p_w32")
    converted = create_model("fcos_hrnetv2p_w32", checkpoint_path=str(path), score_thresh=0.02, **TINY).eval()
    torch.testing.assert_close(converted.backbone.body.conv1.weight, ckpt["state_dict"]["backbone.conv1.weight"].flip(1))
    rgb = torch.rand(3, 80, 110)
    with torch.no_grad():
        expected = reference([rgb[[2, 1, 0]]])[0]
        got = converted([rgb])[0]
    assert expected["boxes"].shape[0] > 10
    torch.testing.assert_close(got["labels"], expected["labels"])
    torch.testing.assert_close(got["scores"], expected["scores"], rtol=0, atol=1e-5)
    torch.testing.assert_close(got["boxes"], expected["boxes"], rtol=0, atol=1e-3)
