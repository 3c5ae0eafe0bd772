"""Cascade RoI heads (Cascade R-CNN, Cascade Mask R-CNN, Hybrid Task Cascade) as the reference
computes them (see docs/NUMERICS.md, 'Cascade test-time scoring').

Each stage is a ``StandardRoIHeads`` (its own IoU threshold, box coder weights, sampler and losses);
``CascadeRoIHeads`` chains them: proposals are refined by every stage's class-agnostic deltas, the
test-time score is the softmax of the stages' mean logits, and masks average the mask heads'
probabilities. HTC adds the interleaved box/mask training, the mask information flow and the fused
semantic branch.
"""
from typing import Any, Dict, Final, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import boxes as box_ops

from .precision import float32_if_half
from .roi_align import ReferenceRoIAlign
from .roi_heads import StandardRoIHeads, label_masks, mask_head, positives
from .semantic import FusedSemanticHead, conv_relu

MASK_ENSEMBLES = ("mean", "last")


def average(tensors: List[Tensor]) -> Tensor:
    """``sum(tensors) / len(tensors)``, summed in the same order; TorchScript has no ``sum`` of tensors."""
    total = tensors[0]
    for t in tensors[1:]:
        total = total + t
    return total / len(tensors)


class ClassAgnosticPredictor(FastRCNNPredictor):
    """Class scores plus a single box per RoI for every class (the reference's reg_class_agnostic)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)


class InfoFlowMaskHead(nn.Module):
    """HTC's mask trunk: the four 3x3 convs, fed the RoI feature plus, from the second head on,
    ``conv_res`` (1x1 + ReLU) of the previous head's trunk output (the mask information flow)."""

    def __init__(self, with_conv_res: bool, channels: int = 256):
        super().__init__()
        self.convs = mask_head(channels)
        self.conv_res = conv_relu(channels, channels, 1) if with_conv_res else None

    def forward(self, x: Tensor, previous: Optional[Tensor] = None) -> Tensor:
        if previous is not None:
            if self.conv_res is None:
                raise ValueError("the first HTC mask head takes no previous feature")
            x = x + self.conv_res(previous)
        return self.convs(x)


class CascadeStage(StandardRoIHeads):
    """One cascade stage. It also records which of its sampled RoIs are the ground-truth boxes
    added as proposals, since the reference does not refine those into the next stage."""

    # TorchScript reads attribute types from the first class in the MRO that declares any, so
    # torchvision's declarations are repeated next to the one added here.
    __annotations__ = {**RoIHeads.__annotations__, "_sampled": List[Tensor]}

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._sampled = []

    def subsample(self, labels: List[Tensor]) -> List[Tensor]:
        """torchvision's ``subsample``, restated (TorchScript has no ``super()``), keeping its result."""
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        self._sampled = [torch.where(pos | neg)[0] for pos, neg in zip(sampled_pos, sampled_neg)]
        return self._sampled

    def sample(self, proposals: List[Tensor], targets: List[Dict[str, Tensor]]
               ) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
        """``select_training_samples`` plus, per image, a mask of the sampled ground-truth boxes."""
        sampled, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        # torchvision appends the ground truths after the proposals before sampling.
        is_gt = [inds >= len(p) for inds, p in zip(self._sampled, proposals)]
        return sampled, matched_idxs, labels, regression_targets, is_gt

    def refine(self, box_regression: Tensor, rois: List[Tensor], image_shapes: List[Tuple[int, int]]
               ) -> List[Tensor]:
        """The RoIs moved by this stage's class-agnostic deltas, clipped to their image."""
        boxes = self.box_coder.decode(float32_if_half(box_regression), rois).reshape(-1, 4)
        return [box_ops.clip_boxes_to_image(b, s)
                for b, s in zip(boxes.split([len(r) for r in rois]), image_shapes)]


class CascadeRoIHeads(nn.Module):
    """Args:
        stages: the cascade's stages, first to last; all with masks or all without.
        stage_loss_weights: each stage's loss multiplier (the reference's [1, 0.5, 0.25]).
        mask_info_flow: HTC's chained mask heads (the stages' mask heads are ``InfoFlowMaskHead``).
        interleaved: HTC's training order: each stage's mask branch learns on RoIs re-sampled from
            the boxes that stage has just refined.
        semantic_head, semantic_roi_pool: HTC's semantic branch, pooled into box and mask features.
        mask_ensemble: test-time masks from the ``"mean"`` of all mask heads' probabilities (the
            reference v2, which produced the published metrics) or the ``"last"`` head only
            (mmdetection 3.x's HTC).

    Stages are picked by looping over them, since TorchScript indexes module lists only with
    literals; ``with_mask`` and ``mask_info_flow`` are constants to TorchScript, so it compiles
    only the mask-head calls a model has.
    """

    with_mask: Final[bool]
    mask_info_flow: Final[bool]

    def __init__(self, stages: Sequence[CascadeStage], stage_loss_weights: Sequence[float] = (1.0, 0.5, 0.25),
                 *, mask_info_flow: bool = False, interleaved: bool = False,
                 semantic_head: Optional[FusedSemanticHead] = None,
                 semantic_roi_pool: Optional[ReferenceRoIAlign] = None, mask_ensemble: str = "mean"):
        super().__init__()
        if len(stages) != len(stage_loss_weights):
            raise ValueError(f"{len(stages)} stages for {len(stage_loss_weights)} stage loss weights")
        if len({s.has_mask() for s in stages}) != 1:
            raise ValueError("either every cascade stage has a mask branch or none has")
        if mask_ensemble not in MASK_ENSEMBLES:
            raise ValueError(f"mask_ensemble={mask_ensemble!r}; expected one of {MASK_ENSEMBLES}")
        if (semantic_head is None) != (semantic_roi_pool is None):
            raise ValueError("semantic_head and semantic_roi_pool go together")
        self.stages = nn.ModuleList(stages)
        self.stage_loss_weights = list(stage_loss_weights)
        self.with_mask = stages[0].has_mask()
        self.mask_info_flow = mask_info_flow
        self.interleaved = interleaved
        self.semantic_head = semantic_head
        self.semantic_roi_pool = semantic_roi_pool
        self.mask_ensemble = mask_ensemble

    def has_mask(self) -> bool:
        return self.with_mask

    def _semantic_rois(self, semantic: Optional[Tensor], boxes: List[Tensor],
                       image_shapes: List[Tuple[int, int]]) -> Optional[Tensor]:
        if self.semantic_roi_pool is None or semantic is None:
            return None
        return self.semantic_roi_pool({"0": semantic}, boxes, image_shapes)

    def box_forward(self, stage: int, features: Dict[str, Tensor], boxes: List[Tensor],
                    image_shapes: List[Tuple[int, int]], semantic: Optional[Tensor] = None
                    ) -> Tuple[Tensor, Tensor]:
        """Class logits and deltas of stage ``stage``'s box head on ``boxes``."""
        out: Optional[Tuple[Tensor, Tensor]] = None
        for i, head in enumerate(self.stages):
            if i == stage:
                x = head.box_roi_pool(features, boxes, image_shapes)
                sem = self._semantic_rois(semantic, boxes, image_shapes)
                if sem is not None:
                    x = x + F.adaptive_avg_pool2d(sem, x.shape[-2:])
                out = head.box_predictor(head.box_head(x))
        if out is None:
            raise IndexError(f"no cascade stage {stage}")
        return out

    def mask_forward(self, stage: int, features: Dict[str, Tensor], boxes: List[Tensor],
                     image_shapes: List[Tuple[int, int]], semantic: Optional[Tensor] = None,
                     all_heads: bool = False) -> List[Tensor]:
        """Mask logits of head ``stage`` (and, with ``all_heads``, of every head before it) on
        ``boxes``; with the information flow, each head also gets the previous trunk's output."""
        pooled: Optional[Tensor] = None
        for i, head in enumerate(self.stages):
            if i == stage:
                pooled = head.mask_roi_pool(features, boxes, image_shapes)
        if pooled is None:
            raise IndexError(f"no cascade stage {stage}")
        x = pooled
        sem = self._semantic_rois(semantic, boxes, image_shapes)
        if sem is not None:
            x = x + sem
        first = 0 if (self.mask_info_flow or all_heads) else stage
        previous: Optional[Tensor] = None
        logits: List[Tensor] = []
        for i, head in enumerate(self.stages):
            if first <= i <= stage:
                if self.mask_info_flow:
                    feat = head.mask_head(x, previous)
                    previous = feat
                else:
                    feat = head.mask_head(x)
                if all_heads or i == stage:
                    logits.append(head.mask_predictor(feat))
        return logits

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor],
                image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        semantic: Optional[Tensor] = None
        losses: Dict[str, Tensor] = {}
        if self.semantic_head is not None:
            seg_logits, semantic = self.semantic_head(list(features.values()))
            if self.training and targets is not None:
                loss = self.semantic_head.loss(seg_logits, targets)
                if loss is not None:
                    losses["loss_semantic_seg"] = loss
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            losses.update(self._losses(features, proposals, image_shapes, targets, semantic))
            return [], losses
        return self._predict(features, proposals, image_shapes, semantic), losses

    def _losses(self, features: Dict[str, Tensor], proposals: List[Tensor],
                image_shapes: List[Tuple[int, int]], targets: List[Dict[str, Tensor]],
                semantic: Optional[Tensor]) -> Dict[str, Tensor]:
        losses: Dict[str, Tensor] = {}
        last = len(self.stages) - 1
        for i, head in enumerate(self.stages):
            weight = self.stage_loss_weights[i]
            rois, matched_idxs, labels, regression_targets, is_gt = head.sample(proposals, targets)
            class_logits, box_regression = self.box_forward(i, features, rois, image_shapes, semantic)
            loss_cls, loss_box = head.box_losses(class_logits, box_regression, labels, regression_targets)
            losses[f"loss_classifier_s{i}"] = loss_cls * weight
            losses[f"loss_box_reg_s{i}"] = loss_box * weight
            if i < last or self.interleaved:
                with torch.no_grad():
                    refined = head.refine(box_regression.detach(), rois, image_shapes)
                    proposals = [b[~g] for b, g in zip(refined, is_gt)]
            if self.with_mask:
                if self.interleaved:
                    with torch.no_grad():
                        rois, matched_idxs, labels, _, _ = head.sample(proposals, targets)
                pos_rois, pos_idxs, pos_labels = positives(rois, matched_idxs, labels)
                logits = self.mask_forward(i, features, pos_rois, image_shapes, semantic)[0]
                losses[f"loss_mask_s{i}"] = head.mask_losses(logits, targets, pos_rois, pos_idxs,
                                                             pos_labels) * weight
        return losses

    def box_scores(self, features: Dict[str, Tensor], proposals: List[Tensor],
                   image_shapes: List[Tuple[int, int]], semantic: Optional[Tensor]
                   ) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """Class logits averaged over the stages, the last stage's deltas tiled for every class,
        and the RoIs the last stage saw: what its ``postprocess_detections`` decodes."""
        rois = proposals
        stage_logits: List[Tensor] = []
        last = len(self.stages) - 1
        box_regression = proposals[0].new_zeros((0, 4))
        for i, head in enumerate(self.stages):
            class_logits, box_regression = self.box_forward(i, features, rois, image_shapes, semantic)
            stage_logits.append(float32_if_half(class_logits))
            if i < last:
                rois = head.refine(box_regression, rois, image_shapes)
        # The reference averages the raw logits (sum, then divide) and decodes the last
        # stage's single box for every class.
        mean_logits = average(stage_logits)
        return mean_logits, box_regression.repeat(1, mean_logits.shape[1]), rois

    def mask_probs(self, features: Dict[str, Tensor], boxes: List[Tensor], labels: List[Tensor],
                   image_shapes: List[Tuple[int, int]], semantic: Optional[Tensor]) -> List[Tensor]:
        """Each detection's own-class mask probabilities per image (N, 1, M, M): the last head's,
        or the mean of every head's with ``mask_ensemble="mean"``."""
        logits = self.mask_forward(len(self.stages) - 1, features, boxes, image_shapes, semantic,
                                   all_heads=self.mask_ensemble == "mean")
        probs = [label_masks(x, labels) for x in logits]
        return [average([p[j] for p in probs]) for j in range(len(boxes))]

    def _predict(self, features: Dict[str, Tensor], proposals: List[Tensor],
                 image_shapes: List[Tuple[int, int]], semantic: Optional[Tensor]
                 ) -> List[Dict[str, Tensor]]:
        mean_logits, tiled, rois = self.box_scores(features, proposals, image_shapes, semantic)
        result: List[Dict[str, Tensor]] = []
        for i, head in enumerate(self.stages):
            if i == len(self.stages) - 1:
                boxes, scores, labels = head.postprocess_detections(mean_logits, tiled, rois, image_shapes)
                result = [{"boxes": b, "labels": lab, "scores": s} for b, s, lab in zip(boxes, scores, labels)]
        if self.with_mask:
            probs = self.mask_probs(features, [r["boxes"] for r in result], [r["labels"] for r in result],
                                    image_shapes, semantic)
            for r, p in zip(result, probs):
                r["masks"] = p
        return result
