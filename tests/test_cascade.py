"""Cascade R-CNN, Cascade Mask R-CNN and HTC: the reference's sizes and key layout, the cascade's
training losses and gradients, and torchvision's eval contract."""
import re

import pytest
import torch

import hrnetdet
from hrnetdet.detectors.cascade import STAGE_STDS
from hrnetdet.zoo.checkpoint import load_into
from hrnetdet.zoo.convert import convert_reference, identify_reference
from hrnetdet.zoo.records import arch_name
from hrnetdet.zoo.registry import list_families
from reference_layout import APPENDIX, APPENDIX_FAMILY, reference_keys

FAMILIES = ("cascade_rcnn", "cascade_mask_rcnn", "htc")
SMALL = dict(min_size=128, max_size=192, rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=150,
             rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_batch_size_per_image=64,
             box_detections_per_img=20)
# torchvision's mask logits have a background channel the reference's lack: 256 + 1 per mask head.
BACKGROUND_ROWS = {"cascade_rcnn": 0, "cascade_mask_rcnn": 3 * 257, "htc": 3 * 257}
SEMANTIC_HEAD_PARAMS = 5 * (256 * 256 + 256) + 4 * (256 * 9 * 256 + 256) + (256 * 256 + 256) + (183 * 256 + 183)


def reference_params(family: str, width: int) -> int:
    text = open(APPENDIX).read()
    return int(re.search(rf"^{APPENDIX_FAMILY[family]} {width} tensors \d+ params (\d+)", text, re.M).group(1))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("width", [18, 32, 40])
def test_parameter_counts_equal_reference(family, width):
    with torch.device("meta"):
        model = hrnetdet.create_model(arch_name(family, width))
    n = sum(p.numel() for p in model.parameters())
    assert n - BACKGROUND_ROWS[family] == reference_params(family, width)


def test_htc_without_semantic_branch_has_no_semantic_parameters():
    with torch.device("meta"):
        model = hrnetdet.create_model("htc_hrnetv2p_w18", semantic=False)
    assert model.roi_heads.semantic_head is None
    n = sum(p.numel() for p in model.parameters())
    assert n - BACKGROUND_ROWS["htc"] == reference_params("htc", 18) - SEMANTIC_HEAD_PARAMS


def test_stage_box_coders_use_the_exact_inverse_stds():
    with torch.device("meta"):
        model = hrnetdet.create_model("cascade_rcnn_hrnetv2p_w18")
    weights = [stage.box_coder.weights for stage in model.roi_heads.stages]
    assert weights[0] == (10.0, 10.0, 5.0, 5.0) and weights[1] == (20.0, 20.0, 10.0, 10.0)
    assert weights[2] == (1 / 0.033, 1 / 0.033, 1 / 0.067, 1 / 0.067) and weights[2][0] != 30.0
    assert [s for s in STAGE_STDS[2]] == [0.033, 0.033, 0.067, 0.067]
    ious = [(s.proposal_matcher.high_threshold, s.proposal_matcher.min_pos_iou) for s in model.roi_heads.stages]
    assert ious == [(0.5, -1.0), (0.6, -1.0), (0.7, -1.0)]
    assert model.roi_heads.stage_loss_weights == [1.0, 0.5, 0.25]
    with torch.device("meta"):
        htc = hrnetdet.create_model("htc_hrnetv2p_w18")
    assert [s.proposal_matcher.min_pos_iou for s in htc.roi_heads.stages] == [0.5, 0.6, 0.7]
    assert htc.roi_heads.stages[-1].score_thresh == 0.001 and model.roi_heads.stages[-1].score_thresh == 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_layout_converts_and_loads_strictly(family):
    # Backbone and neck stay on the meta device (the foundation's tests check their values).
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.empty(s, device="meta") if k.startswith(("backbone.", "neck.")) else torch.randn(s, generator=g))
          for k, s in reference_keys(family)}
    found, width = identify_reference(sd, "appendix", list_families())
    assert (found.name, width) == (family, 32)
    assert found.reference.num_classes(sd) == 81
    ours = convert_reference(sd, found, "appendix")
    with torch.device("meta"):
        model = hrnetdet.create_model(f"{family}_hrnetv2p_w32")
    load_into(model, ours, "appendix", f"{family}_hrnetv2p_w32")
    for s in range(3):
        cls_w = ours[f"roi_heads.stages.{s}.box_predictor.cls_score.weight"]
        torch.testing.assert_close(cls_w[0], sd[f"roi_head.bbox_head.{s}.fc_cls.weight"][80])
        torch.testing.assert_close(cls_w[1:], sd[f"roi_head.bbox_head.{s}.fc_cls.weight"][:80])
        torch.testing.assert_close(ours[f"roi_heads.stages.{s}.box_predictor.bbox_pred.bias"],
                                   sd[f"roi_head.bbox_head.{s}.fc_reg.bias"])
        if family != "cascade_rcnn":
            logits = ours[f"roi_heads.stages.{s}.mask_predictor.mask_fcn_logits.weight"]
            assert logits.shape == (81, 256, 1, 1) and logits[0].abs().sum() == 0
            torch.testing.assert_close(logits[1:], sd[f"roi_head.mask_head.{s}.conv_logits.weight"])
    if family == "htc":
        torch.testing.assert_close(ours["roi_heads.stages.2.mask_head.conv_res.0.weight"],
                                   sd["roi_head.mask_head.2.conv_res.conv.weight"])
        torch.testing.assert_close(ours["roi_heads.stages.1.mask_head.convs.3.0.bias"],
                                   sd["roi_head.mask_head.1.convs.3.conv.bias"])
        torch.testing.assert_close(ours["roi_heads.semantic_head.lateral_convs.4.0.weight"],
                                   sd["roi_head.semantic_head.lateral_convs.4.conv.weight"])
        torch.testing.assert_close(ours["roi_heads.semantic_head.conv_logits.bias"],
                                   sd["roi_head.semantic_head.conv_logits.bias"])


def _targets(shapes, semantic):
    targets = []
    for i, (h, w) in enumerate(shapes):
        masks = torch.zeros(2, h, w, dtype=torch.uint8)
        masks[0, 10:60, 20:90] = 1
        masks[1, 70:120, 30:80] = 1
        t = {"boxes": torch.tensor([[20.0, 10, 90, 60], [30, 70, 80, 120]]), "labels": torch.tensor([3, 7 + i]),
             "masks": masks}
        if semantic:
            t["semantic_seg"] = torch.randint(0, 183, (h, w), dtype=torch.uint8)
        targets.append(t)
    return targets


_MODELS = {}


def small_model(family):
    """One W18 model per family for this module's training and eval tests (building one is slow)."""
    if family not in _MODELS:
        torch.manual_seed(0)
        kwargs = dict(box_score_thresh=0.0) if family == "cascade_mask_rcnn" else {}
        _MODELS[family] = hrnetdet.create_model(f"{family}_hrnetv2p_w18", **kwargs, **SMALL)
    model = _MODELS[family]
    model.zero_grad(set_to_none=True)
    # The HRNet body's backward dominates the run time and is not what these tests are about.
    model.backbone.body.requires_grad_(False)
    return model


def _stage_heads(model):
    for i, stage in enumerate(model.roi_heads.stages):
        yield f"box_head.{i}", stage.box_head
        yield f"box_predictor.{i}", stage.box_predictor
        if stage.has_mask():
            yield f"mask_head.{i}", stage.mask_head
            yield f"mask_predictor.{i}", stage.mask_predictor


@pytest.mark.parametrize("family", ["cascade_mask_rcnn", "htc"])
def test_training_losses_finite_and_gradients_reach_every_stage(family):
    model = small_model(family).train()
    shapes = [(130, 150), (128, 160)] if family == "cascade_mask_rcnn" else [(128, 144)]
    images = [torch.rand(3, h, w) for h, w in shapes]
    losses = model(images, _targets(shapes, semantic=family == "htc"))
    stage_losses = ["loss_classifier", "loss_box_reg", "loss_mask"]
    expected = {f"{n}_s{i}" for n in stage_losses for i in range(3)} | {"loss_objectness", "loss_rpn_box_reg"}
    if family == "htc":
        expected.add("loss_semantic_seg")
    assert set(losses) == expected
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    sum(losses.values()).backward()
    modules = dict(_stage_heads(model))
    if family == "htc":
        modules["semantic_head"] = model.roi_heads.semantic_head
    for name, module in modules.items():
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


def test_htc_trains_without_semantic_maps(caplog):
    model = small_model("htc").train()
    images = [torch.rand(3, 128, 160)]
    with caplog.at_level("WARNING", logger="hrnetdet"):
        losses = model(images, _targets([(128, 160)], semantic=False))
        assert model.roi_heads.semantic_head.loss(torch.zeros(1, 183, 16, 20), [{}]) is None
    assert "loss_semantic_seg" not in losses and len(losses) == 11
    assert all(torch.isfinite(v) for v in losses.values())
    assert sum("semantic_seg" in r.getMessage() for r in caplog.records) == 1
    sum(losses.values()).backward()
    assert model.roi_heads.semantic_head.conv_logits.weight.grad is None
    assert model.roi_heads.semantic_head.conv_embedding[0].weight.grad.abs().sum() > 0


@pytest.fixture
def cascade_mask():
    return small_model("cascade_mask_rcnn").eval()


def test_eval_contract(cascade_mask):
    with torch.no_grad():
        out = cascade_mask([torch.rand(3, 100, 140), torch.rand(3, 90, 120)])
    assert len(out) == 2
    for r, (h, w) in zip(out, [(100, 140), (90, 120)]):
        n = r["boxes"].shape[0]
        assert 0 < n <= 20
        assert r["boxes"].dtype == torch.float32 and r["labels"].dtype == torch.int64
        assert r["labels"].min() >= 1 and r["labels"].max() <= 80
        assert (r["boxes"][:, 2] <= w).all() and (r["boxes"][:, 3] <= h).all() and (r["boxes"] >= 0).all()
        assert r["masks"].shape == (n, 1, h, w) and set(r["masks"].unique().tolist()) <= {0.0, 1.0}
        assert (r["scores"][:-1] >= r["scores"][1:]).all()


def test_scores_are_the_softmax_of_the_mean_stage_logits(cascade_mask):
    heads = cascade_mask.roi_heads
    features = {str(i): torch.randn(1, 256, 32 // 2 ** i, 48 // 2 ** i) for i in range(5)}
    proposals = [torch.tensor([[10.0, 12, 60, 70], [30, 5, 120, 90], [0, 0, 40, 30]])]
    shapes = [(128, 192)]
    with torch.no_grad():
        result = heads(features, proposals, shapes)[0][0]
        rois, logits = proposals, []
        for i, stage in enumerate(heads.stages):
            cls, reg = heads.box_forward(i, features, rois, shapes)
            logits.append(cls)
            if i < 2:
                rois = stage.refine(reg, rois, shapes)
        probs = torch.softmax((logits[0] + logits[1] + logits[2]) / 3, dim=1)
        boxes = heads.stages[2].refine(reg, rois, shapes)[0]
    top = result["scores"].argmax()
    label = result["labels"][top]
    roi = (result["boxes"][top] - boxes).abs().sum(1).argmin()
    torch.testing.assert_close(result["boxes"][top], boxes[roi])
    torch.testing.assert_close(result["scores"][top], probs[roi, label])


def test_eval_without_detections(cascade_mask):
    heads = cascade_mask.roi_heads.stages[-1]
    heads.score_thresh = 1.0
    try:
        with torch.no_grad():
            r = cascade_mask([torch.rand(3, 100, 140)])[0]
    finally:
        heads.score_thresh = 0.0
    assert r["boxes"].shape == (0, 4) and r["scores"].shape == (0,) and r["labels"].shape == (0,)
    assert r["masks"].shape == (0, 1, 100, 140)


def test_htc_mask_ensemble_mean_and_last():
    model = small_model("htc").eval()
    image = [torch.rand(3, 100, 140)]
    model.transform.mask_thresh = None
    try:
        with torch.no_grad():
            mean = model(image)[0]
            model.roi_heads.mask_ensemble = "last"
            last = model(image)[0]
    finally:
        model.transform.mask_thresh, model.roi_heads.mask_ensemble = 0.5, "mean"
    assert mean["boxes"].shape[0] > 0 and mean["masks"].shape == (mean["boxes"].shape[0], 1, 100, 140)
    torch.testing.assert_close(mean["boxes"], last["boxes"])
    assert not torch.allclose(mean["masks"], last["masks"])
    with pytest.raises(ValueError, match="mask_ensemble"):
        hrnetdet.create_model("htc_hrnetv2p_w18", mask_ensemble="first")
