"""Two-stage detectors (Faster R-CNN, Mask R-CNN) composed from the parts: HRNetV2p backbone ->
RPN -> RoI heads, in torchvision's GeneralizedRCNN contract."""
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

from ..backbone import HRNet
from ..heads.anchors import ReferenceAnchorGenerator
from ..heads.roi_align import ReferenceRoIAlign
from ..heads.roi_heads import StandardRoIHeads, box_head, mask_head
from ..heads.rpn import Float32RPNHead, ReferenceRPN
from ..neck import HRFPN, HRNetV2p
from .settings import (IMAGENET_MEAN, IMAGENET_STD, CascadeSettings, DetectorSettings, RCNNSettings,  # noqa: F401
                       make_settings)
from .targets import check_targets
from .transform import ReferenceTransform, scriptable_alias

ROI_FEATMAPS = ("0", "1", "2", "3")


class HRNetDetector(GeneralizedRCNN):
    """A GeneralizedRCNN that also carries its category names (index 0 is the background) and
    the input normalisation it expects."""

    def __init__(self, backbone: nn.Module, rpn: nn.Module, roi_heads: nn.Module,
                 transform: ReferenceTransform, categories: Optional[Sequence[str]] = None):
        super().__init__(backbone, rpn, roi_heads, transform)
        self.categories: List[str] = list(categories) if categories is not None else []

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None
                ) -> Tuple[Dict[str, Tensor], List[Dict[str, Tensor]]]:
        """GeneralizedRCNN's forward; an empty list of images gives an empty list of detections, and
        training targets are checked first (``targets.py``)."""
        if len(images) == 0 and not self.training:
            losses: Dict[str, Tensor] = {}
            detections: List[Dict[str, Tensor]] = []
            if torch.jit.is_scripting():
                return losses, detections
            return self.eager_outputs(losses, detections)
        if self.training and not torch.jit.is_scripting():
            self.check_training_targets(images, targets)
        return self.generalized_rcnn_forward(images, targets)

    @torch.jit.unused
    def check_training_targets(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]]) -> None:
        heads = self.roi_heads
        box_heads = heads.stages[0] if hasattr(heads, "stages") else heads
        check_targets(images, targets, box_heads.box_predictor.cls_score.out_features)

    generalized_rcnn_forward = scriptable_alias(GeneralizedRCNN.forward, "generalized_rcnn_forward")


def hrnetv2p_backbone(width: int, *, fpn_stride: int = 1, norm_eval: bool = True,
                      frozen_stages: int = -1) -> HRNetV2p:
    body = HRNet(width, norm_eval=norm_eval, frozen_stages=frozen_stages)
    return HRNetV2p(body, HRFPN(body.out_channels, 256, num_outs=5, stride=fpn_stride))


def build_transform(settings: DetectorSettings, mask_thresh: Optional[float]) -> ReferenceTransform:
    return ReferenceTransform(settings.min_size, settings.max_size, list(settings.image_mean),
                              list(settings.image_std), mask_thresh=mask_thresh)


def build_rpn(settings: Optional[RCNNSettings] = None, *, cascade: bool = False) -> ReferenceRPN:
    """The reference's RPN; ``cascade`` selects the Cascade/HTC training losses and border rule
    (and, without ``settings``, the cascades' default proposal counts)."""
    if settings is None:
        settings = CascadeSettings() if cascade else RCNNSettings()
    return ReferenceRPN(
        ReferenceAnchorGenerator(), Float32RPNHead(256, 3),
        pre_nms_top_n={"training": settings.rpn_pre_nms_top_n_train, "testing": settings.rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": settings.rpn_post_nms_top_n_train, "testing": settings.rpn_post_nms_top_n_test},
        nms_thresh=settings.rpn_nms_thresh, batch_size_per_image=settings.rpn_batch_size_per_image,
        box_loss="smooth_l1" if cascade else "l1", allowed_border=0 if cascade else -1,
    )


def build_rcnn(width: int, num_classes: int = 81, *, with_mask: bool = False,
               categories: Optional[Sequence[str]] = None, settings: Optional[RCNNSettings] = None,
               **changes: Any) -> HRNetDetector:
    """Faster R-CNN (``with_mask=False``) or Mask R-CNN on HRNetV2p-W``width``.

    ``num_classes`` counts the background; ``settings`` (an ``RCNNSettings``, its defaults when
    None) with the keyword ``changes`` over it (``min_size=640``, ``score_thresh=0.3``...).
    """
    settings = make_settings(RCNNSettings, settings, changes)
    box_pool = ReferenceRoIAlign(ROI_FEATMAPS, 7)
    mask_kwargs: Dict[str, Any] = {}
    if with_mask:
        mask_kwargs = dict(mask_roi_pool=ReferenceRoIAlign(ROI_FEATMAPS, 14), mask_head=mask_head(),
                           mask_predictor=MaskRCNNPredictor(256, 256, num_classes))
    roi_heads = StandardRoIHeads(
        box_pool, box_head(), FastRCNNPredictor(1024, num_classes),
        min_pos_iou=0.5 if with_mask else -1.0, score_thresh=settings.score_thresh,
        nms_thresh=settings.nms_thresh, detections_per_img=settings.detections_per_img,
        batch_size_per_image=settings.box_batch_size_per_image, **mask_kwargs,
    )
    return build_detector(width, roi_heads, settings, categories=categories)


def build_detector(width: int, roi_heads: nn.Module, settings: RCNNSettings, *,
                   categories: Optional[Sequence[str]] = None, cascade: bool = False) -> HRNetDetector:
    """HRNetV2p-W``width`` + RPN + the given RoI heads + the reference transform: the assembly
    every two-stage family shares; the model keeps ``settings``."""
    model = HRNetDetector(
        hrnetv2p_backbone(width, norm_eval=settings.norm_eval, frozen_stages=settings.frozen_stages),
        build_rpn(settings, cascade=cascade), roi_heads, build_transform(settings, settings.mask_thresh),
        categories,
    )
    model.settings = settings
    return model
