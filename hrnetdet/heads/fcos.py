"""FCOS head with the reference's semantics, which torchvision's ``FCOSHead``
cannot reproduce: centerness from the cls tower, distances ``exp(scale_l * raw)`` in input pixels,
points at ``(x + 0.5) * s`` on fixed strides, final score ``cls * ctr`` (see docs/NUMERICS.md, 'FCOS head').

Test-time post-processing comes in two versions because the reference changed it after the
checkpoints were published (docs/NUMERICS.md, 'FCOS test-time order'):

* ``"v2"`` (default): the mmdet v2.7 code that produced the published AP. Per level the top
  ``topk_candidates`` *locations* by ``max_c(cls * ctr)``; scores ``cls * ctr`` thresholded at
  ``score_thresh``.
* ``"v3"``: mmdet 3.3, which the parity harness runs. Per level the top ``topk_candidates``
  *(location, class) pairs* with ``cls > score_thresh``; centerness multiplied afterwards; boxes
  with a zero side dropped.
"""
import math
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image, sigmoid_focal_loss

from .nms import batched_nms
from .precision import float32_if_half

INF = 1e8
FCOS_STRIDES = (8, 16, 32, 64, 128)
FCOS_REGRESS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, INF))
POSTPROCESS_VERSIONS = ("v2", "v3")


class Scale(nn.Module):
    """A learnable scalar (mmcv ``Scale``; the checkpoint key is ``scale``)."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels: int, num_convs: int, num_groups: int) -> nn.Sequential:
    return nn.Sequential(*[
        nn.Sequential(OrderedDict(conv=nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  gn=nn.GroupNorm(num_groups, channels),
                                  relu=nn.ReLU(inplace=True)))
        for _ in range(num_convs)
    ])


def fcos_points(sizes: List[Tuple[int, int]], strides: List[int], dtype: torch.dtype,
                device: torch.device) -> List[Tensor]:
    """Per level, the (x, y) input-pixel centre of every location, row-major: ``(i + 0.5) * s``."""
    points: List[Tensor] = []
    for (h, w), s in zip(sizes, strides):
        xs = (torch.arange(w, dtype=dtype, device=device) + 0.5) * s
        ys = (torch.arange(h, dtype=dtype, device=device) + 0.5) * s
        points.append(torch.stack([xs.repeat(h), ys.repeat_interleave(w)], dim=1))
    return points


def distance_to_boxes(points: Tensor, distances: Tensor) -> Tensor:
    """(left, top, right, bottom) distances from points to (x1, y1, x2, y2) boxes."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def iou_log_loss(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """``-log(IoU)`` of aligned box pairs, IoU clamped at ``eps`` (mmdet ``IoULoss(mode='log')``)."""
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    area_p = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    union = (area_p + area_t - overlap).clamp(min=eps)
    return -(overlap / union).clamp(min=eps).log()


def centerness_targets(distances: Tensor) -> Tensor:
    lr, tb = distances[:, 0::2], distances[:, 1::2]
    return torch.sqrt((lr.min(-1).values / lr.max(-1).values) * (tb.min(-1).values / tb.max(-1).values))


def _mean_over_ranks(t: Tensor) -> Tensor:
    """The reference normalises losses by counts averaged over all processes (mmdet ``reduce_mean``)."""
    if not torch.jit.is_scripting():
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            t = t.clone()
            torch.distributed.all_reduce(t.div_(torch.distributed.get_world_size()))
    return t


class FCOSHead(nn.Module):
    """Args:
        in_channels: channels of every pyramid level (256).
        num_classes: foreground classes (80 for COCO; sigmoid, no background channel).
        num_convs, num_groups: tower depth and GroupNorm groups (4, 32).
        strides, regress_ranges: per level; fixed, never inferred from feature sizes.
        score_thresh, nms_thresh, topk_candidates, detections_per_img: test settings (names as in
            torchvision's FCOS; values the reference's).
        postprocess: ``"v2"`` (the published numbers) or ``"v3"`` (mmdet 3.3); see the module doc.
    """

    def __init__(self, in_channels: int, num_classes: int, *, num_convs: int = 4, num_groups: int = 32,
                 strides: Sequence[int] = FCOS_STRIDES,
                 regress_ranges: Sequence[Tuple[float, float]] = FCOS_REGRESS_RANGES,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, topk_candidates: int = 1000,
                 detections_per_img: int = 100, postprocess: str = "v2"):
        super().__init__()
        if postprocess not in POSTPROCESS_VERSIONS:
            raise ValueError(f"postprocess must be one of {POSTPROCESS_VERSIONS}, got {postprocess!r}")
        if len(strides) != len(regress_ranges):
            raise ValueError(f"{len(strides)} strides but {len(regress_ranges)} regress ranges")
        self.num_classes = num_classes
        self.strides = [int(s) for s in strides]
        self.regress_ranges = [(float(lo), float(hi)) for lo, hi in regress_ranges]
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.topk_candidates = topk_candidates
        self.detections_per_img = detections_per_img
        self.postprocess = postprocess
        self.cls_convs = _tower(in_channels, num_convs, num_groups)
        self.reg_convs = _tower(in_channels, num_convs, num_groups)
        self.conv_cls = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The reference's init: every conv N(0, 0.01) with zero bias; conv_cls bias for a 1% prior.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.conv_cls.bias, -math.log((1 - 0.01) / 0.01))

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Per level: class logits (N, HW, K), box distances (N, HW, 4) in input pixels and
        centerness logits (N, HW)."""
        cls_logits: List[Tensor] = []
        distances: List[Tensor] = []
        ctr_logits: List[Tensor] = []
        for i, scale in enumerate(self.scales):
            x = features[i]
            n = x.shape[0]
            cls_feat = self.cls_convs(x)
            reg_feat = self.reg_convs(x)
            cls_logits.append(self.conv_cls(cls_feat).permute(0, 2, 3, 1).reshape(n, -1, self.num_classes))
            ctr_logits.append(self.conv_centerness(cls_feat).permute(0, 2, 3, 1).reshape(n, -1))
            dist = scale(self.conv_reg(reg_feat)).float().exp()
            distances.append(dist.permute(0, 2, 3, 1).reshape(n, -1, 4))
        return cls_logits, distances, ctr_logits

    # ------------------------------------------------------------------ training
    def assign_targets(self, points: Tensor, ranges: Tensor, boxes: Tensor, labels: Tensor
                       ) -> Tuple[Tensor, Tensor]:
        """One image: each point takes the smallest-area box that contains it and whose largest
        distance lies in the point's regress range. Returns labels (0 = background) and
        (l, t, r, b) distance targets."""
        num_points = points.shape[0]
        if boxes.shape[0] == 0:
            return (torch.zeros(num_points, dtype=torch.int64, device=points.device),
                    points.new_zeros((num_points, 4)))
        areas = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].repeat(num_points, 1)
        xs, ys = points[:, 0:1], points[:, 1:2]
        dist = torch.stack([xs - boxes[:, 0], ys - boxes[:, 1], boxes[:, 2] - xs, boxes[:, 3] - ys], dim=-1)
        inside = dist.min(-1).values > 0
        max_dist = dist.max(-1).values
        in_range = (max_dist >= ranges[:, 0:1]) & (max_dist <= ranges[:, 1:2])
        no_box = 1e8  # the reference's INF
        areas[~(inside & in_range)] = no_box
        min_area, idx = areas.min(dim=1)
        point_labels = labels[idx].clone()
        point_labels[min_area == no_box] = 0
        return point_labels, dist[torch.arange(num_points, device=points.device), idx]

    def compute_loss(self, targets: List[Dict[str, Tensor]], cls_logits: List[Tensor],
                     distances: List[Tensor], ctr_logits: List[Tensor], points: List[Tensor]
                     ) -> Dict[str, Tensor]:
        """Focal loss over num_pos, centerness-weighted ``-log IoU`` over the centerness-target sum,
        centerness BCE over num_pos; counts averaged over processes (the reference's rule)."""
        eps = 1.1920928955078125e-07  # float32 eps: mmdet's weight_reduce_loss divides by (avg_factor + eps)
        all_points = torch.cat(points)
        level_ranges: List[Tensor] = []
        for p, (lo, hi) in zip(points, self.regress_ranges):
            level_ranges.append(torch.tensor([lo, hi], dtype=p.dtype, device=p.device).expand(p.shape[0], 2))
        ranges = torch.cat(level_ranges)
        labels_l: List[Tensor] = []
        dist_l: List[Tensor] = []
        for t in targets:
            lab, dist = self.assign_targets(all_points, ranges, t["boxes"], t["labels"])
            labels_l.append(lab)
            dist_l.append(dist)
        labels = torch.stack(labels_l).flatten()
        dist_targets = torch.stack(dist_l).reshape(-1, 4)
        cls = torch.cat(cls_logits, dim=1).reshape(-1, self.num_classes)
        pred_dist = torch.cat(distances, dim=1).reshape(-1, 4)
        ctr = torch.cat(ctr_logits, dim=1).flatten()
        flat_points = all_points.repeat(len(targets), 1)

        pos = torch.nonzero(labels > 0).squeeze(1)
        num_pos = _mean_over_ranks(torch.tensor(float(pos.numel()), device=cls.device)).clamp(min=1.0)
        one_hot = F.one_hot(labels, self.num_classes + 1)[:, 1:].to(cls.dtype)
        loss_cls = sigmoid_focal_loss(cls, one_hot, alpha=0.25, gamma=2.0, reduction="sum") / (num_pos + eps)

        pos_dist = pred_dist[pos]
        pos_ctr = ctr[pos]
        if pos.numel() == 0:
            return {"loss_classification": loss_cls, "loss_bbox_regression": pos_dist.sum(),
                    "loss_bbox_ctrness": pos_ctr.sum()}
        pos_targets = dist_targets[pos]
        ctr_targets = centerness_targets(pos_targets)
        ctr_denorm = _mean_over_ranks(ctr_targets.sum().detach()).clamp(min=1e-6)
        pos_points = flat_points[pos]
        loss_box = iou_log_loss(distance_to_boxes(pos_points, pos_dist),
                                distance_to_boxes(pos_points, pos_targets))
        loss_box = (loss_box * ctr_targets).sum() / (ctr_denorm + eps)
        loss_ctr = F.binary_cross_entropy_with_logits(pos_ctr, ctr_targets, reduction="sum") / (num_pos + eps)
        return {"loss_classification": loss_cls, "loss_bbox_regression": loss_box, "loss_bbox_ctrness": loss_ctr}

    # ------------------------------------------------------------------ inference
    def postprocess_detections(self, cls_logits: List[Tensor], distances: List[Tensor],
                               ctr_logits: List[Tensor], points: List[Tensor],
                               image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Detections in resized-image coordinates, labels 1..K."""
        detections: List[Dict[str, Tensor]] = []
        for i, image_size in enumerate(image_sizes):
            all_boxes: List[Tensor] = []
            all_scores: List[Tensor] = []
            all_labels: List[Tensor] = []
            for cls_l, dist_l, ctr_l, pts in zip(cls_logits, distances, ctr_logits, points):
                scores = torch.sigmoid(float32_if_half(cls_l[i]))
                ctr = torch.sigmoid(float32_if_half(ctr_l[i]))
                dist = dist_l[i]
                if self.postprocess == "v2":
                    if scores.shape[0] > self.topk_candidates:
                        keep = (scores * ctr[:, None]).max(dim=1).values.topk(self.topk_candidates).indices
                        scores, ctr, dist, pts = scores[keep], ctr[keep], dist[keep], pts[keep]
                    num_loc = scores.shape[0]
                    scores = (scores * ctr[:, None]).flatten()
                    labels = torch.arange(self.num_classes, device=scores.device).repeat(num_loc)
                    loc = torch.arange(num_loc, device=scores.device).repeat_interleave(self.num_classes)
                    valid = scores > self.score_thresh
                    scores, labels, loc = scores[valid], labels[valid], loc[valid]
                else:
                    valid = scores > self.score_thresh
                    candidates = torch.nonzero(valid)
                    scores, order = scores[valid].sort(descending=True)
                    k = min(self.topk_candidates, int(candidates.shape[0]))
                    loc, labels = candidates[order[:k]].unbind(dim=1)
                    scores = scores[:k] * ctr[loc]
                boxes = clip_boxes_to_image(distance_to_boxes(pts[loc], dist[loc]), image_size)
                all_boxes.append(boxes)
                all_scores.append(scores)
                all_labels.append(labels)
            boxes = torch.cat(all_boxes)
            scores = torch.cat(all_scores)
            labels = torch.cat(all_labels)
            if self.postprocess == "v3":
                nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
                boxes, scores, labels = boxes[nonempty], scores[nonempty], labels[nonempty]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            detections.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep] + 1})
        return detections
