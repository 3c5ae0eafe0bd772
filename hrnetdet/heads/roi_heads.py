"""Box and mask RoI heads for Faster / Mask R-CNN on torchvision's RoIHeads, with the reference's
losses: CE + L1 box loss on (0.1, 0.1, 0.2, 0.2)-scaled deltas, aligned mask
targets, and masks returned as 28x28 probabilities that the transform pastes.
See docs/NUMERICS.md, 'Box post-processing', 'Losses' and 'Mask targets'."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import clip_boxes_to_image

from .masks import mask_loss, mask_targets
from .matcher import ReferenceMatcher
from .nms import batched_nms
from .precision import float32_if_half
from .roi_align import ReferenceRoIAlign
from .rpn import box_regression_loss


def box_head(in_channels: int = 256, resolution: int = 7, representation: int = 1024) -> TwoMLPHead:
    """The reference's Shared2FCBBoxHead trunk: flatten, fc 1024 + ReLU, fc 1024 + ReLU."""
    return TwoMLPHead(in_channels * resolution ** 2, representation)


def mask_head(in_channels: int = 256) -> MaskRCNNHeads:
    """Four 3x3 conv + ReLU layers (the reference's FCNMaskHead trunk)."""
    return MaskRCNNHeads(in_channels, (256, 256, 256, 256), 1)


def label_masks(mask_logits: Tensor, labels: List[Tensor]) -> List[Tensor]:
    """Sigmoid of each detection's own-class mask channel, split per image as (N, 1, M, M)."""
    lab = torch.cat(labels)
    probs = mask_logits[torch.arange(lab.shape[0], device=lab.device), lab].sigmoid()[:, None]
    return list(probs.split([len(x) for x in labels], dim=0))


def positives(proposals: List[Tensor], matched_idxs: List[Tensor], labels: List[Tensor]
              ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """The foreground part of sampled RoIs: their boxes, ground-truth indices and labels."""
    pos = [torch.where(lab > 0)[0] for lab in labels]
    return ([p[i] for p, i in zip(proposals, pos)], [m[i] for m, i in zip(matched_idxs, pos)],
            [lab[i] for lab, i in zip(labels, pos)])


class StandardRoIHeads(RoIHeads):
    """Args beyond torchvision's:
        box_loss, box_loss_beta: ``"l1"`` for Faster/Mask, ``"smooth_l1"`` (beta 1) for cascades.
        min_pos_iou: enables low-quality matches at this IoU (Mask R-CNN: 0.5); negative disables.
        mask_size: side of the mask targets (28).
    """

    def __init__(self, box_roi_pool: ReferenceRoIAlign, box_head: nn.Module, box_predictor: nn.Module, *,
                 fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5, min_pos_iou: float = -1.0,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 bbox_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 box_loss: str = "l1", box_loss_beta: float = 1.0,
                 mask_roi_pool: Optional[ReferenceRoIAlign] = None, mask_head: Optional[nn.Module] = None,
                 mask_predictor: Optional[nn.Module] = None, mask_size: int = 28):
        super().__init__(box_roi_pool, box_head, box_predictor, fg_iou_thresh, bg_iou_thresh,
                         batch_size_per_image, positive_fraction, bbox_reg_weights, score_thresh,
                         nms_thresh, detections_per_img, mask_roi_pool, mask_head, mask_predictor)
        self.proposal_matcher = ReferenceMatcher(fg_iou_thresh, bg_iou_thresh, min_pos_iou)
        self.box_loss = box_loss
        self.box_loss_beta = box_loss_beta
        self.mask_size = mask_size

    def box_losses(self, class_logits: Tensor, box_regression: Tensor, labels: List[Tensor],
                   regression_targets: List[Tensor]) -> Tuple[Tensor, Tensor]:
        lab = torch.cat(labels)
        targets = torch.cat(regression_targets)
        loss_cls = F.cross_entropy(class_logits, lab)
        pos = torch.where(lab > 0)[0]
        deltas = box_regression.reshape(lab.shape[0], -1, 4)
        # Class-agnostic heads predict one box (index 0) for every class.
        cls_index = lab[pos] if deltas.shape[1] > 1 else torch.zeros_like(lab[pos])
        loss_box = box_regression_loss(deltas[pos, cls_index], targets[pos], self.box_loss,
                                       self.box_loss_beta) / max(lab.numel(), 1)
        return loss_cls, loss_box

    def postprocess_detections(self, class_logits: Tensor, box_regression: Tensor, proposals: List[Tensor],
                               image_shapes: List[Tuple[int, int]]
                               ) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Decode every class's box and run ``multiclass_nms`` per image."""
        class_logits, box_regression = float32_if_half(class_logits), float32_if_half(box_regression)
        counts = [p.shape[0] for p in proposals]
        pred_boxes = self.box_coder.decode(box_regression, proposals).split(counts, 0)
        pred_scores = F.softmax(class_logits, -1).split(counts, 0)
        all_boxes: List[Tensor] = []
        all_scores: List[Tensor] = []
        all_labels: List[Tensor] = []
        for boxes, scores, image_shape in zip(pred_boxes, pred_scores, image_shapes):
            boxes, scores, labels = self.multiclass_nms(boxes, scores, image_shape)
            all_boxes.append(boxes)
            all_scores.append(scores)
            all_labels.append(labels)
        return all_boxes, all_scores, all_labels

    def multiclass_nms(self, boxes: Tensor, scores: Tensor, image_shape: Tuple[int, int]
                       ) -> Tuple[Tensor, Tensor, Tensor]:
        """The reference's ``multiclass_nms`` on one image's (N, K, 4) boxes and (N, K) class
        probabilities, background first: every (box, foreground class) pair scoring above
        ``score_thresh`` goes through class-wise NMS with the reference's arithmetic (``nms.py``);
        unlike torchvision, boxes under 0.01 px are not dropped first. Test-time augmentation calls
        it on boxes and scores averaged over the passes."""
        num_classes = scores.shape[-1]
        boxes = clip_boxes_to_image(boxes, image_shape)[:, 1:].reshape(-1, 4)
        labels = torch.arange(num_classes, device=scores.device).expand_as(scores)[:, 1:].reshape(-1)
        scores = scores[:, 1:].reshape(-1)
        inds = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[inds], scores[inds], labels[inds]
        keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return boxes[keep], scores[keep], labels[keep]

    def mask_losses(self, mask_logits: Tensor, targets: List[Dict[str, Tensor]], proposals: List[Tensor],
                    matched_idxs: List[Tensor], labels: List[Tensor]) -> Tensor:
        """Mask loss of the positive RoIs ``proposals`` (see ``positives``)."""
        tgt = mask_targets([t["masks"] for t in targets], proposals, matched_idxs, self.mask_size)
        return mask_loss(mask_logits, labels, tgt)

    def mask_logits(self, features: Dict[str, Tensor], boxes: List[Tensor],
                    image_shapes: List[Tuple[int, int]]) -> Tensor:
        # The None checks let TorchScript compile heads that have no mask branch.
        if self.mask_roi_pool is not None and self.mask_head is not None and self.mask_predictor is not None:
            return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))
        raise RuntimeError("these RoI heads have no mask branch")

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor],
                image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        result: List[Dict[str, Tensor]] = []
        losses: Dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
            feats = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
            class_logits, box_regression = self.box_predictor(feats)
            loss_cls, loss_box = self.box_losses(class_logits, box_regression, labels, regression_targets)
            losses = {"loss_classifier": loss_cls, "loss_box_reg": loss_box}
            if self.has_mask():
                mask_props, mask_idxs, mask_labels = positives(proposals, matched_idxs, labels)
                logits = self.mask_logits(features, mask_props, image_shapes)
                losses["loss_mask"] = self.mask_losses(logits, targets, mask_props, mask_idxs, mask_labels)
            return result, losses

        feats = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(feats)
        boxes, scores, labels = self.postprocess_detections(class_logits, box_regression, proposals, image_shapes)
        for b, s, lab in zip(boxes, scores, labels):
            result.append({"boxes": b, "labels": lab, "scores": s})
        if self.has_mask():
            det_boxes = [r["boxes"] for r in result]
            logits = self.mask_logits(features, det_boxes, image_shapes)
            for r, m in zip(result, label_masks(logits, [r["labels"] for r in result])):
                r["masks"] = m
        return result, losses
