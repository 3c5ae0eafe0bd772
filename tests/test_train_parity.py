"""Training parity with the reference, checked without the reference: its RPN assignment on the
training-parity harness batch and its optimisation recipes, both recorded by the harness
(tools/parity/train_reference.py, train_compare.py) in tests/data."""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.detection.image_list import ImageList

import hrnetdet
from hrnetdet.detectors.rcnn import build_rpn

DATA = Path(__file__).parent / "data"
# The reference configs' values, recorded by train_reference.py from mmdetection 3.3's W18 configs.
REFERENCE_RECIPES = json.loads((DATA / "reference_recipes.json").read_text())
FAMILIES = ("faster_rcnn", "mask_rcnn", "cascade_rcnn", "cascade_mask_rcnn", "htc", "fcos")


def hrnetdet_training_recipe(arch: str) -> dict:
    """hrnetdet's training recipe of ``arch`` as plain values, plus its parameter-group rule and
    learning-rate factor: the one place this file reads the training engine."""
    from hrnetdet.engine import train
    family = hrnetdet.zoo.registry.get_family(arch)[0]
    recipe = family.recipe
    defaults = {f.name: f.default for f in dataclasses.fields(train.TrainConfig)}
    schedule = train.default_schedule(arch)
    return dict(recipe=recipe, momentum=defaults["momentum"], weight_decay=defaults["weight_decay"],
                warmup_iters=defaults["warmup_iters"], schedule=schedule,
                schedule_fractions=train.SCHEDULES[schedule], all_schedules=train.SCHEDULES,
                param_groups=lambda model, lr, wd: train.param_groups(model, lr, wd, recipe),
                lr_factor=lambda it, milestones, warmup: train.lr_factor(it, milestones, warmup, recipe))


@pytest.mark.parametrize("family", FAMILIES)
def test_recipe_equals_reference_config(family):
    ref = REFERENCE_RECIPES[family]
    ours = hrnetdet_training_recipe(f"{family}_hrnetv2p_w18")
    recipe = ours["recipe"]
    assert ref["optimizer"] == "SGD" and ref["base_batch_size"] == 16  # hrnetdet's base_lr is per 16 images
    assert recipe.base_lr == ref["base_lr"]
    assert (ours["momentum"], ours["weight_decay"]) == (ref["momentum"], ref["weight_decay"])
    assert recipe.warmup == ref["warmup"] and recipe.warmup_ratio == pytest.approx(ref["warmup_ratio"], rel=1e-12)
    assert ours["warmup_iters"] == ref["warmup_iters"]
    assert recipe.grad_clip == ref["grad_clip"] and ref["grad_clip_norm_type"] in (None, 2)  # clipping is L2
    assert (recipe.bias_lr_mult, recipe.bias_decay_mult) == (ref["bias_lr_mult"], ref["bias_decay_mult"])
    # the default schedule is the config's: its length and step epochs
    sched = REFERENCE_RECIPES["schedules"][ours["schedule"]]
    assert sched["max_epochs"] == ref["max_epochs"] and sched["milestones"] == ref["milestones"]
    assert list(ours["schedule_fractions"]) == [m / ref["max_epochs"] for m in ref["milestones"]]


def test_every_schedule_steps_at_the_reference_epochs():
    ours = hrnetdet_training_recipe("faster_rcnn_hrnetv2p_w18")["all_schedules"]
    for tag, ref in REFERENCE_RECIPES["schedules"].items():
        assert list(ours[tag]) == [m / ref["max_epochs"] for m in ref["milestones"]], tag


@pytest.mark.parametrize("family", ("faster_rcnn", "fcos"))
def test_learning_rate_factor_follows_reference_warmup_and_steps(family):
    ref = REFERENCE_RECIPES[family]
    ours = hrnetdet_training_recipe(f"{family}_hrnetv2p_w18")
    warmup, milestones = ref["warmup_iters"], [1000, 2000]
    factor = lambda it: ours["lr_factor"](it, milestones, warmup)
    # mmengine's LinearLR: start_factor + (1 - start_factor) * it / iters; ConstantLR: factor until iters
    mid = (ref["warmup_ratio"] + (1 - ref["warmup_ratio"]) * 0.5) if ref["warmup"] == "linear" else ref["warmup_ratio"]
    assert factor(0) == pytest.approx(ref["warmup_ratio"], rel=1e-9)
    assert factor(warmup // 2) == pytest.approx(mid, rel=1e-9)
    assert factor(warmup) == 1.0
    assert factor(1000) == pytest.approx(ref["gamma"]) and factor(2000) == pytest.approx(ref["gamma"] ** 2)


@pytest.mark.parametrize("family", ("faster_rcnn", "fcos"))
def test_weight_decay_and_bias_learning_rate_exemptions_equal_reference(family):
    """mmengine's rule with the config's paramwise_cfg: biases outside norm layers get bias_lr_mult and
    bias_decay_mult; norm layers' parameters get norm_decay_mult (1: decayed like the rest)."""
    ref = REFERENCE_RECIPES[family]
    ours = hrnetdet_training_recipe(f"{family}_hrnetv2p_w18")
    with torch.device("meta"):
        model = hrnetdet.create_model(f"{family}_hrnetv2p_w18")
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in ours["param_groups"](model, 1.0, 1.0) for p in g["params"]}
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
    kinds = set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, norm_types):
                expected, kind = (1.0, ref["norm_decay_mult"]), "norm"
            elif name == "bias":
                expected, kind = (ref["bias_lr_mult"], ref["bias_decay_mult"]), "bias"
            else:
                expected, kind = (1.0, 1.0), "weight"
            assert setting[id(p)] == expected, (name, module)
            kinds.add(kind)
    assert kinds == {"norm", "bias", "weight"}


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_training_mode_equals_reference(family):
    """The reference's HRNet keeps BN in eval mode while training (norm_eval) and freezes no stage."""
    ref = REFERENCE_RECIPES[family]
    with torch.device("meta"):
        model = hrnetdet.create_model(f"{family}_hrnetv2p_w18")
    body = model.backbone.body
    assert (body.norm_eval, body.frozen_stages) == (ref["norm_eval"], ref["frozen_stages"])
    model.train()
    assert all(not m.training for m in body.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", ("faster_rcnn", "cascade_rcnn"))
def test_rpn_assignment_equals_reference(family):
    """Every anchor's state (positive, negative, ignored) on the harness batch: two images, 256x384 and
    320x256, padded together to 320x384. The reference ignores the anchors beyond each image's own
    padded size (its valid flags), so the larger image's padding adds no negatives to the smaller one;
    the cascades also ignore anchors crossing the image border (allowed_border 0)."""
    fx = np.load(DATA / "reference_rpn_assignment.npz")
    rpn = build_rpn(cascade=family == "cascade_rcnn")
    h, w = (int(v) for v in fx["batch_shape"])
    sizes = [(int(a), int(b)) for a, b in fx["image_sizes"]]
    # HRFPN's five levels (strides 4..64; the last is pooled from the stride-32 one, flooring)
    grid = [(math.ceil(h / 4) // 2 ** i, math.ceil(w / 4) // 2 ** i) for i in range(5)]
    anchors = rpn.anchor_generator(ImageList(torch.zeros(2, 3, h, w), sizes),
                                   [torch.zeros(2, 1, gh, gw) for gh, gw in grid])
    labels, _ = rpn.assign_targets_to_anchors(anchors, [{"boxes": torch.from_numpy(fx[f"boxes{i}"])} for i in (0, 1)])
    for i in (0, 1):
        ref = torch.from_numpy(fx[f"{family}_state{i}"]).long()
        assert labels[i].shape == ref.shape
        differ = torch.nonzero(labels[i].long() != ref).flatten()
        assert len(differ) == 0, f"image {i}: {len(differ)} anchors differ, e.g. {differ[:5].tolist()}"
        assert (ref == 1).sum() > 0 and (ref == 0).sum() > 0


def test_semantic_loss_follows_mmdetection_2_0_rule():
    """HTC's semantic loss averages over the non-ignored pixels, as mmdetection 2.0's FusedSemanticHead
    (``nn.CrossEntropyLoss(ignore_index=255)``) that trained the published models; mmdetection 3.3 averages
    over every pixel (the training-parity harness compares under 3.3's rule and converts)."""
    from hrnetdet.heads.semantic import FusedSemanticHead
    head = FusedSemanticHead(num_ins=2, channels=8, num_classes=5, stride=8, loss_weight=0.2)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 4, 6, generator=g, dtype=torch.float64)
    maps = [torch.randint(0, 5, (32, 40), generator=g), torch.randint(0, 5, (24, 48), generator=g)]
    maps[0][8:16] = 255                                   # an ignore band; the padding is ignored too
    labels = torch.full((2, 32, 48), 255, dtype=torch.long)
    for i, m in enumerate(maps):
        labels[i, :m.shape[0], :m.shape[1]] = m
    labels = labels[:, ::8, ::8]                          # nearest neighbour at 1/8: every 8th pixel
    targets = [{"semantic_seg": m} for m in maps]
    assert torch.equal(head.labels(logits, targets), labels)
    ignored = float((labels == 255).double().mean())
    assert 0.2 < ignored < 0.6
    expected = nn.CrossEntropyLoss(ignore_index=255)(logits, labels) * 0.2
    loss = head.loss(logits, targets)
    torch.testing.assert_close(loss, expected)
    all_pixels = nn.CrossEntropyLoss(ignore_index=255, reduction="sum")(logits, labels) / labels.numel() * 0.2
    torch.testing.assert_close(all_pixels / loss, torch.tensor(1 - ignored, dtype=torch.float64))
