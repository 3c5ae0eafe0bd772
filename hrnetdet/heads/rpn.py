"""Region proposal network with the reference's training rules: L1 or SmoothL1(1/9)
box loss, MaxIoU low-quality matching with a minimum IoU, and an optional allowed border.
See docs/NUMERICS.md, 'RPN proposals', 'Assignment and sampling' and 'Losses'."""
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import boxes as box_ops

from .anchors import ReferenceAnchorGenerator
from .matcher import ReferenceMatcher
from .nms import batched_nms
from .precision import float32_if_half


def box_regression_loss(pred: Tensor, target: Tensor, kind: str, beta: float) -> Tensor:
    """Summed box regression loss; ``kind`` is ``"l1"`` or ``"smooth_l1"``."""
    if kind == "l1":
        return F.l1_loss(pred, target, reduction="sum")
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")
    raise ValueError("unknown box loss '" + kind + "'; expected 'l1' or 'smooth_l1'")


class Float32RPNHead(RPNHead):
    """torchvision's RPN head, with float32 outputs when its convolutions ran in half precision:
    proposals are decoded from them (``precision.py``)."""

    def forward(self, x: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        logits: List[Tensor] = []
        deltas: List[Tensor] = []
        for feature in x:
            t = self.conv(feature)
            logits.append(float32_if_half(self.cls_logits(t)))
            deltas.append(float32_if_half(self.bbox_pred(t)))
        return logits, deltas


class ReferenceRPN(RegionProposalNetwork):
    """Args beyond torchvision's:
        box_loss, box_loss_beta: the reference's RPN box loss (Faster/Mask: ``"l1"``; cascades:
            ``"smooth_l1"`` with beta 1/9).
        min_pos_iou: low-quality matches need at least this IoU (0.3 in every reference config).
        allowed_border: anchors further than this outside the image are ignored in training
            (-1 keeps all: Faster/Mask; 0 for the cascades).
        size_divisible: the transform's padding multiple. In training, anchors beyond an image's own
            padded size (in the padding a larger image of the batch adds) are ignored, whatever
            ``allowed_border``, as the reference's valid flags do.
    """

    def __init__(self, anchor_generator: ReferenceAnchorGenerator, head: Float32RPNHead, *,
                 fg_iou_thresh: float = 0.7, bg_iou_thresh: float = 0.3, min_pos_iou: float = 0.3,
                 batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_top_n: Dict[str, int], post_nms_top_n: Dict[str, int],
                 nms_thresh: float = 0.7, box_loss: str = "l1", box_loss_beta: float = 1.0 / 9,
                 allowed_border: float = -1.0, size_divisible: int = 32):
        super().__init__(anchor_generator, head, fg_iou_thresh, bg_iou_thresh, batch_size_per_image,
                         positive_fraction, pre_nms_top_n, post_nms_top_n, nms_thresh, score_thresh=0.0)
        self.proposal_matcher = ReferenceMatcher(fg_iou_thresh, bg_iou_thresh, min_pos_iou)
        self.box_loss = box_loss
        self.box_loss_beta = box_loss_beta
        self.allowed_border = allowed_border
        self.size_divisible = size_divisible

    def assign_targets_to_anchors(self, anchors: List[Tensor], targets: List[Dict[str, Tensor]]
                                  ) -> Tuple[List[Tensor], List[Tensor]]:
        labels: List[Tensor] = []
        matched: List[Tensor] = []
        for i, (anchors_i, target) in enumerate(zip(anchors, targets)):
            gt = target["boxes"]
            inside = self._inside(anchors_i, i)
            if gt.numel() == 0:
                lab = torch.zeros(anchors_i.shape[0], dtype=torch.float32, device=anchors_i.device)
                matched.append(torch.zeros_like(anchors_i))
            else:
                quality = box_ops.box_iou(gt, anchors_i)
                # Anchors outside the allowed border take no part in the assignment at all.
                quality = torch.where(inside[None, :], quality, torch.full_like(quality, -1.0))
                idx = self.proposal_matcher(quality)
                matched.append(gt[idx.clamp(min=0)])
                lab = (idx >= 0).to(torch.float32)
                lab[idx == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0.0
                lab[idx == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1.0
            lab[~inside] = -1.0
            labels.append(lab)
        return labels, matched

    def _inside(self, anchors: Tensor, image_index: int) -> Tensor:
        valid = self.anchor_generator.valid_flags(image_index, self.size_divisible, anchors.device)
        if self.allowed_border < 0:
            return valid
        h, w = self.anchor_generator.image_sizes[image_index]
        b = self.allowed_border
        return (valid & (anchors[:, 0] >= -b) & (anchors[:, 1] >= -b)
                & (anchors[:, 2] < w + b) & (anchors[:, 3] < h + b))

    def top_n_idx(self, objectness: Tensor, num_anchors_per_level: List[int]) -> Tensor:
        """Per image, the indices of each level's ``pre_nms_top_n`` highest objectness scores
        (torchvision's private ``_get_top_n_idx``, which may change without notice)."""
        idx: List[Tensor] = []
        offset = 0
        for level in objectness.split(num_anchors_per_level, 1):
            num_anchors = level.shape[1]
            idx.append(level.topk(min(self.pre_nms_top_n(), num_anchors), dim=1)[1] + offset)
            offset += num_anchors
        return torch.cat(idx, dim=1)

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_shapes: List[Tuple[int, int]],
                         num_anchors_per_level: List[int]) -> Tuple[List[Tensor], List[Tensor]]:
        """The reference's proposal filter: the top ``pre_nms_top_n`` per level, clipped, boxes of
        zero width or height dropped (torchvision: under 1e-3 px), NMS per level with the
        reference's arithmetic (``nms.py``), the top ``post_nms_top_n`` kept."""
        num_images = proposals.shape[0]
        objectness = objectness.detach().reshape(num_images, -1)
        levels = torch.cat([torch.full((n,), i, dtype=torch.int64, device=proposals.device)
                            for i, n in enumerate(num_anchors_per_level)])
        top_n_idx = self.top_n_idx(objectness, num_anchors_per_level)
        batch_idx = torch.arange(num_images, device=proposals.device)[:, None]
        scores_all = torch.sigmoid(objectness[batch_idx, top_n_idx])
        final_boxes: List[Tensor] = []
        final_scores: List[Tensor] = []
        for boxes, scores, lvl, image_shape in zip(proposals[batch_idx, top_n_idx], scores_all,
                                                    levels[top_n_idx], image_shapes):
            boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
            keep = torch.where((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            final_boxes.append(boxes[keep])
            final_scores.append(scores[keep])
        return final_boxes, final_scores

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: List[Tensor],
                     regression_targets: List[Tensor]) -> Tuple[Tensor, Tensor]:
        pos, neg = self.fg_bg_sampler(labels)
        pos_inds = torch.where(torch.cat(pos, dim=0))[0]
        neg_inds = torch.where(torch.cat(neg, dim=0))[0]
        sampled = torch.cat([pos_inds, neg_inds], dim=0)
        labels_all = torch.cat(labels, dim=0)
        targets_all = torch.cat(regression_targets, dim=0)
        num = max(sampled.numel(), 1)
        box_loss = box_regression_loss(pred_bbox_deltas[pos_inds], targets_all[pos_inds],
                                       self.box_loss, self.box_loss_beta) / num
        obj_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], labels_all[sampled], reduction="sum") / num
        return obj_loss, box_loss
