#!/usr/bin/env python
"""FCOS head parity against mmdetection 3.3's ``FCOSHead``, training included (compare.py covers
inference of whole models only).

Run with the reference venv:

    /work/parity_env/bin/python tools/parity/fcos_head_check.py

Both heads get the same random weights (spread so that scores and boxes vary) and the same random
pyramid (the level sizes of an 800x1216 padded input); checks that forward outputs, the mmdet 3.3
test-time rule (hrnetdet ``postprocess="v3"``), the three losses and their gradients agree.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]
import mmcv_ops_standin  # noqa: E402,F401  (must precede mmdet)

import warnings  # noqa: E402

import torch  # noqa: E402
from mmengine.config import ConfigDict  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.structures import InstanceData  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402
from mmdet.utils import register_all_modules  # noqa: E402

from hrnetdet.heads.fcos import FCOSHead, fcos_points  # noqa: E402

warnings.filterwarnings('ignore')
MMLogger.get_instance('mmengine', log_level='WARNING')

SIZES = [(100, 152), (50, 76), (25, 38), (13, 19), (6, 10)]   # 800x1216 padded, HRFPN stride 2
IMG_SHAPE = (797, 1200)                                       # resized, unpadded


def reference_head() -> torch.nn.Module:
    register_all_modules()
    head = MODELS.build(dict(
        type='FCOSHead', num_classes=80, in_channels=256, stacked_convs=4, feat_channels=256,
        strides=[8, 16, 32, 64, 128], norm_cfg=dict(type='GN', num_groups=32, requires_grad=True),
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='IoULoss', loss_weight=1.0),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
        test_cfg=ConfigDict(nms_pre=1000, min_bbox_size=0, score_thr=0.05,
                            nms=dict(type='nms', iou_threshold=0.5), max_per_img=100)))
    head.init_weights()
    with torch.no_grad():
        for m in head.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
        head.conv_cls.weight.normal_(0, 0.02)
        head.conv_cls.bias.fill_(-3.0)
        head.conv_centerness.weight.normal_(0, 0.02)
        head.conv_reg.weight.normal_(0, 0.01)
        head.conv_reg.bias.fill_(3.0)
        for i, s in enumerate(head.scales):
            s.scale.fill_(0.8 + 0.1 * i)
    return head


def random_gts(n_images: int, n: int = 6):
    gts = []
    for _ in range(n_images):
        xy = torch.rand(n, 2) * torch.tensor([1000., 700.])
        wh = torch.rand(n, 2) * torch.tensor([600., 500.]) + 8
        boxes = torch.cat([xy, (xy + wh).min(torch.tensor([1200., 797.]))], 1)
        gts.append(InstanceData(bboxes=boxes, labels=torch.randint(0, 80, (n,))))
    return gts


def main() -> int:
    torch.manual_seed(0)
    ref = reference_head()
    ours = FCOSHead(256, 80, postprocess='v3')
    ours.load_state_dict(ref.state_dict(), strict=True)
    feats = [torch.randn(2, 256, h, w) for h, w in SIZES]
    metas = [dict(img_shape=IMG_SHAPE, scale_factor=(1.0, 1.0), pad_shape=(800, 1216))] * 2
    points = fcos_points(SIZES, ours.strides, torch.float32, torch.device('cpu'))

    ref.eval(), ours.eval()
    with torch.no_grad():
        cls_r, box_r, ctr_r = ref(feats)
        cls_o, dist_o, ctr_o = ours(feats)
        for a, b in zip(cls_r + box_r, cls_o + dist_o):
            torch.testing.assert_close(a.permute(0, 2, 3, 1).reshape(b.shape), b, rtol=0, atol=0)
        dets_r = ref.predict_by_feat(cls_r, box_r, ctr_r, batch_img_metas=metas, rescale=False)
        dets_o = ours.postprocess_detections(cls_o, dist_o, ctr_o, points, [IMG_SHAPE] * 2)
    for r, o in zip(dets_r, dets_o):
        torch.testing.assert_close(o['labels'], r.labels + 1, rtol=0, atol=0)
        torch.testing.assert_close(o['scores'], r.scores, rtol=0, atol=0)
        torch.testing.assert_close(o['boxes'], r.bboxes, rtol=0, atol=0)
        print(f"inference: {len(r.scores)} detections, identical labels, scores and boxes")

    ref.train(), ours.train()
    gts = random_gts(2)
    losses_r = ref.loss_by_feat(*ref(feats), gts, metas)
    losses_o = ours.compute_loss([{'boxes': g.bboxes, 'labels': g.labels + 1} for g in gts], *ours(feats), points)
    sum(losses_r.values()).backward()
    sum(losses_o.values()).backward()
    for kr, ko in [('loss_cls', 'loss_classification'), ('loss_bbox', 'loss_bbox_regression'),
                   ('loss_centerness', 'loss_bbox_ctrness')]:
        print(f"{ko:16s} mmdet {losses_r[kr].item():.7f} hrnetdet {losses_o[ko].item():.7f}")
        torch.testing.assert_close(losses_o[ko], losses_r[kr], rtol=1e-5, atol=0)
    grads_r = {k: p.grad for k, p in ref.named_parameters()}
    worst = max(((g - grads_r[k]).norm() / grads_r[k].norm()).item() for k, g in
                ((k, p.grad) for k, p in ours.named_parameters()))
    print(f"gradients: worst relative difference over all {len(grads_r)} parameters {worst:.2e}")
    assert worst < 1e-5
    return 0


if __name__ == '__main__':
    sys.exit(main())
